"""The indexer's top-k slot selection: the one-launch row kernel (ops/triton/topk.py) against torch.topk + the
slot-mapping kernel, the split top-k (ops/triton/topk_split.py: few long rows over many programs) and the sampled
top-k (ops/triton/topk_sampled.py: many wide rows), on indexer-like logits (sums over 64 heads of weighted
relu(q.k)), -inf past each row's kv_len as the indexer writes them, k = 2048 (DeepSeek-V3.2). Up to 256 rows
are a decode batch (kv_len anywhere, the key width a CUDA graph's power-of-two bucket); more rows are a prefill
chunk (consecutive kv_len ending at the width). Each selection is checked first (the selected values equal
torch.topk's as multisets, valid slots first); times are CUDA-graph replays (no host launch cost), median, L2
flushed. "misses": the rows whose sample missed (the sampled kernel's slow path).

    python benchmarks/topk.py [--cases 1x8192 64x8192 ...] [--output-json topk.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kernels import bench

from dsaserve.ops.triton import indexer, topk as row_topk, topk_sampled, topk_split

K = 2048
PAGE = 64
DEFAULT_CASES = ["1x4096", "1x8192", "16x8192", "64x8192", "1x16384", "8x16384", "64x16384", "256x16384", "1x32768",
                 "1x65536", "8x65536", "16x65536", "64x65536", "1x131072", "8x131072", "256x8192", "1024x8192",
                 "4096x4096", "4096x8192", "4096x16384", "4096x32768", "2048x65536", "64x32768", "128x32768"]


def logits_like_indexer(rows: int, width: int, kv_len: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dev = kv_len.device
    out = torch.empty(rows, width, device=dev)
    keys = torch.randn(width, 128, device=dev, generator=gen, dtype=torch.bfloat16)
    for r0 in range(0, rows, 256):  # in row chunks: [rows, 64 heads, width] would not fit at prefill sizes
        r1 = min(rows, r0 + 256)
        q = torch.randn(r1 - r0, 64, 128, device=dev, generator=gen, dtype=torch.bfloat16)
        w = torch.randn(r1 - r0, 64, device=dev, generator=gen)
        out[r0:r1] = torch.einsum("rh,rhn->rn", w, torch.relu(q @ keys.T).float())
    return out.masked_fill(torch.arange(width, device=dev)[None, :] >= kv_len[:, None], float("-inf"))


def check(got: torch.Tensor, logits: torch.Tensor, kv_len: torch.Tensor, page_table: torch.Tensor) -> None:
    """Valid slots first; the selected values are each row's top min(kv_len, K) values."""
    n = kv_len.clamp(max=K)
    assert torch.equal(got >= 0, torch.arange(K, device=got.device)[None, :] < n[:, None]), "layout of -1"
    slot_pos = torch.zeros((int(page_table.max()) + 1) * PAGE, dtype=torch.long, device=got.device)
    slots = (page_table[0].long()[:, None] * PAGE + torch.arange(PAGE, device=got.device)).flatten()
    slot_pos[slots] = torch.arange(slots.numel(), device=got.device)
    pos = slot_pos[got.clamp(min=0).long()]
    vals = logits.gather(1, pos).masked_fill(got < 0, float("-inf")).sort(1, descending=True).values
    want = logits.topk(K, dim=1).values.masked_fill(torch.arange(K, device=got.device)[None] >= n[:, None],
                                                    float("-inf"))
    assert torch.equal(vals, want), "selected values differ from torch.topk's"


def run_case(rows: int, width: int, gen: torch.Generator, warp_sweep: list[int],
             sampled_sweep: list[tuple[int, int, int]]) -> dict:
    dev = torch.device("cuda")
    # The longest row ends in the upper half of the bucket, as under CUDA graphs; the others anywhere.
    kv_len = torch.randint(K // 2, width + 1, (rows,), device=dev, generator=gen)
    kv_len[0] = width // 2 + 1 + width // 8
    if rows > 256:  # a prefill chunk's rows
        kv_len = (torch.arange(rows, device=dev) + width - rows + 1).clamp(min=1)
    logits = logits_like_indexer(rows, width, kv_len, gen)
    pages = width // PAGE
    page_table = torch.randperm(pages * 2, device=dev, generator=gen)[:pages].int()[None, :]
    row_req = torch.zeros(rows, dtype=torch.int32, device=dev)
    kv = kv_len.int()[:, None]
    row = {"rows": rows, "width": width, "misses": sample_misses(logits, kv_len)}
    methods = {"torch.topk": indexer.torch_topk_slots, "sampled": topk_sampled.sampled_topk_slots}
    if width <= row_topk.ROW_LIMIT:
        methods["row kernel"] = row_topk.row_topk_slots
    if rows <= topk_split.MAX_ROWS:
        methods["split"] = topk_split.split_topk_slots
    for name, fn in methods.items():
        check(fn(logits, kv, page_table, row_req, PAGE, K), logits, kv_len, page_table)
        row[name] = 1e3 * bench(lambda: fn(logits, kv, page_table, row_req, PAGE, K), graph=True)
    for warps in warp_sweep if width <= row_topk.ROW_LIMIT else []:
        def select() -> torch.Tensor:
            return row_topk.row_topk_slots(logits, kv, page_table, row_req, PAGE, K, num_warps=warps)
        check(select(), logits, kv_len, page_table)
        row[f"{warps} warps"] = 1e3 * bench(select, graph=True)
    for warps, chunk, maxnreg in sampled_sweep:
        def select() -> torch.Tensor:
            return topk_sampled.sampled_topk_slots(logits, kv, page_table, row_req, PAGE, K, warps, chunk, maxnreg)
        check(select(), logits, kv_len, page_table)
        row[f"sampled {warps}w {chunk} {maxnreg}"] = 1e3 * bench(select, graph=True)
    return row


def sample_misses(logits: torch.Tensor, kv_len: torch.Tensor) -> int:
    """Rows whose sample's threshold leaves fewer than K or more than CAP keys (topk_sampled's rule, in torch)."""
    cap, size, misses = topk_sampled.cap(K), topk_sampled.sample_size(K, logits.shape[1]), 0
    bits = logits.view(torch.int32).long()
    keys = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)  # topk._order_keys (NaN aside)
    for r in range(logits.shape[0]):
        n = int(kv_len[r])
        if n <= cap:
            continue
        sample = keys[r, (torch.arange(size, device=logits.device) * n) // size]
        rank = min(max((K + cap) * size // 2 // n, 1), size)
        threshold = int(sample.topk(rank).values[-1]) & ~0xFFFF
        misses += not K <= int((keys[r, :n] >= threshold).sum()) <= cap
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="ROWSxWIDTH")
    ap.add_argument("--warps", type=int, nargs="*", default=[], help="also time the row kernel at these warp counts")
    ap.add_argument("--sampled", nargs="*", default=[],
                    help="also time the sampled kernel at these WARPSxCHUNK[xMAXNREG]")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    sweep = [(*map(int, c.split("x")), 0)[:3] for c in args.sampled]
    results = [run_case(*map(int, c.split("x")), gen, args.warps, sweep) for c in args.cases]
    print(f"{torch.cuda.get_device_name()}; k = {K}; us per call (CUDA graph replay, median)")
    print(f"{'rows':>5} {'width':>6} {'torch.topk':>11} {'row kernel':>11} {'split':>8} {'sampled':>8} {'misses':>7}"
          f" {'engine uses':>12}")
    for r in results:
        print(f"{r['rows']:>5} {r['width']:>6} {r['torch.topk']:>11.1f} "
              + "".join(f"{r[m]:>{w}.1f}" if m in r else f"{'-':>{w}}"
                        for m, w in (("row kernel", 12), ("split", 9), ("sampled", 9)))
              + f" {r['misses']:>7} {indexer.selection_path(r['rows'], r['width'], K):>12}"
              + "".join(f"  {w}w {r[f'{w} warps']:.1f}" for w in args.warps if f"{w} warps" in r)
              + "".join(f"  {w}w/{c}/{m} {r[f'sampled {w}w {c} {m}']:.1f}" for w, c, m in sweep))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "k": K,
                                                      "cases": results}, indent=1))


if __name__ == "__main__":
    main()
