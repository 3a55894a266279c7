"""The indexer's top-k slot selection: the one-launch row kernel (ops/triton/topk.py) against torch.topk + the
slot-mapping kernel and the split top-k (ops/triton/topk_split.py: few long rows over many programs), on indexer-like logits (sums over 64 heads of weighted relu(q.k)), -inf past each row's
kv_len as the indexer writes them, k = 2048 (DeepSeek-V3.2). Key widths are the power-of-two buckets a CUDA
graph sees. Each selection is checked first (the selected values equal torch.topk's as multisets, valid
slots first); times are CUDA-graph replays (no host launch cost), median, L2 flushed.

    python benchmarks/topk.py [--cases 1x8192 64x8192 ...] [--output-json topk.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kernels import bench

from dsaserve.ops.triton import indexer, topk as row_topk, topk_split

K = 2048
PAGE = 64
DEFAULT_CASES = ["1x4096", "1x8192", "16x8192", "64x8192", "1x16384", "8x16384", "64x16384", "256x16384", "1x32768",
                 "1x65536", "8x65536", "16x65536", "64x65536", "1x131072", "8x131072", "256x8192", "1024x8192",
                 "4096x4096", "4096x8192"]


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


def run_case(rows: int, width: int, gen: torch.Generator, warp_sweep: list[int]) -> dict:
    dev = torch.device("cuda")
    # The longest row ends in the upper half of the bucket, as under CUDA graphs; the others anywhere.
    kv_len = torch.randint(K // 2, width + 1, (rows,), device=dev, generator=gen)
    kv_len[0] = width // 2 + 1 + width // 8
    logits = logits_like_indexer(rows, width, kv_len, gen)
    pages = width // PAGE
    page_table = torch.randperm(pages * 2, device=dev, generator=gen)[:pages].int()[None, :]
    row_req = torch.zeros(rows, dtype=torch.int32, device=dev)
    kv = kv_len.int()[:, None]
    row = {"rows": rows, "width": width}
    methods = {"torch.topk": indexer.torch_topk_slots}
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
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="ROWSxWIDTH")
    ap.add_argument("--warps", type=int, nargs="*", default=[], help="also time the row kernel at these warp counts")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    results = [run_case(*map(int, c.split("x")), gen, args.warps) for c in args.cases]
    print(f"{torch.cuda.get_device_name()}; k = {K}; us per call (CUDA graph replay, median)")
    print(f"{'rows':>5} {'width':>6} {'torch.topk':>11} {'row kernel':>11} {'split':>8} {'engine uses':>12}")
    for r in results:
        used = ("split" if topk_split.fits(r["rows"], r["width"]) else
                "row kernel" if row_topk.fits(r["rows"], r["width"]) else "torch.topk")
        print(f"{r['rows']:>5} {r['width']:>6} {r['torch.topk']:>11.1f} "
              + "".join(f"{r[m]:>{w}.1f}" if m in r else f"{'-':>{w}}" for m, w in (("row kernel", 12), ("split", 9)))
              + f" {used:>12}" + "".join(f"  {w}w {r[f'{w} warps']:.1f}" for w in args.warps if f"{w} warps" in r))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "k": K,
                                                      "cases": results}, indent=1))


if __name__ == "__main__":
    main()
