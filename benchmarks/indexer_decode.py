"""The indexer's logits at decode rows as a decode step runs them: a CUDA graph of back-to-back
`indexer_logits` calls, each over its own FP8 index-key cache (144-byte rows, page 64, pages in random order),
as the model's layers are; key widths are the power-of-two buckets the graphs see (the longest row ends just
past half of its width, the other rows between half and all of the context). Prints us per call and the
fraction of copy bandwidth measured in the same run on the key bytes read; every swept config's logits are
checked against the default's, the default's against the reference. A case REQUESTSxCONTEXTxROWS gives each
request ROWS causal rows, as an MTP verify step does (S + 1), and also times one row per program (`rows1`).

    python benchmarks/indexer_decode.py [--cases 1x32768 4x32768 16x32784x4 ...] [--sweep] [--output-json out.json]
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("dsaserve") is None:  # PYTHONPATH's dsaserve wins (an A/B against a base package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops.triton import indexer  # noqa: E402
from fp8_decode import decode_main, time_configs  # noqa: E402  (each config: a graph of the calls, us per call)

HEADS, DIM, PAGE, LAYERS = 64, 128, 64, 24
DEFAULT_CASES = ["1x1040", "16x1040", "1x8208", "1x32784", "4x32784", "16x32784"]
ROW_BYTES = kv_format.row_bytes(DIM, 0, kv_format.FP8)


def width_of(context: int) -> int:
    """The graphs' key-width bucket for a context: the next power of two above it."""
    return 1 << context.bit_length()

# The table's columns before the timings: result key, header, format.
COLUMNS = [("rows", "rows", "d"), ("per_request", "per req", "d"), ("context", "context", "d"), ("width", "width", "d"),
           ("key_MB", "key MB", ".2f")]


def layers(requests: int, context: int, per: int, gen: torch.Generator) -> list[tuple]:
    """LAYERS argument tuples of indexer_logits, one cache each; `per` causal rows per request."""
    dev, width = gen.device, width_of(context)
    pages = width // PAGE  # the page table spans the key width, as the engine's does
    rows = requests * per
    req = torch.arange(requests, dtype=torch.int32, device=dev).repeat_interleave(per)
    out = []
    for _ in range(LAYERS):
        table = torch.randperm(requests * pages, device=dev, generator=gen, dtype=torch.int32).reshape(requests, pages)
        keys = torch.randn(requests * pages * PAGE, DIM, device=dev, generator=gen).to(torch.bfloat16)
        q = torch.randn(rows, HEADS, DIM, device=dev, generator=gen).to(torch.bfloat16)
        weights = torch.randn(rows, HEADS, device=dev, generator=gen) * (HEADS * DIM) ** -0.5
        ends = torch.randint(context // 2, context + 1, (requests,), device=dev, generator=gen, dtype=torch.int32)
        ends[0] = context
        causal = torch.arange(per, dtype=torch.int32, device=dev).repeat(requests) - per + 1
        lengths = (ends[req.long()] + causal)[:, None]
        out.append((q, weights, kv_format.quantize_fp8(keys), table, req, lengths, PAGE, width, per))
    return out


def run_case(requests: int, context: int, *rest) -> dict:
    """A case REQUESTSxCONTEXT[xROWS]: ROWS rows per request (default 1)."""
    *given, configs, copy_Bps, gen = rest
    per = given[0] if given else 1
    rows = requests * per
    calls = layers(requests, context, per, gen)
    if per > 1:  # also the tiling without the hint: one row per program, each reading its request's keys
        configs = configs[:1] + [{"block_t": 1}] + configs[1:]
    indexer.CONFIG = None
    base = indexer.indexer_logits(*calls[0])
    if rows * context <= 64 * 32784:
        want = ref.indexer_logits(*calls[0][:-1])
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(base)), "the default's -inf layout differs from the reference's"
        err = ((base[finite] - want[finite]).norm() / want[finite].norm()).item()
        assert err < 2e-3, f"the default's logits are off the reference by {err:.2e}"
    key_bytes = int(calls[0][5][per - 1::per].sum()) * ROW_BYTES  # each request's keys once

    def check(got: torch.Tensor, base: torch.Tensor) -> None:
        finite = torch.isfinite(base)
        assert torch.equal(finite, torch.isfinite(got)) and torch.allclose(got[finite], base[finite], rtol=1e-4,
                                                                            atol=1e-5), "logits differ"

    timed = time_configs(f"{rows}x{context}", indexer, configs, lambda: indexer.indexer_logits(*calls[0]), check,
                         [functools.partial(indexer.indexer_logits, *args) for args in calls], key_bytes, copy_Bps)
    if per > 1:
        rows1 = next((r["us"] for r in timed["swept"] if r["config"] == {"block_t": 1}), float("nan"))
        print(f"{requests}x{context}x{per}: {timed['default_us']:.2f} us per call, one row per program {rows1:.2f}")
    return {"rows": rows, "context": context, "width": width_of(context), "per_request": per,
            "key_MB": key_bytes / 1e6, **timed}


# --sweep: key blocks of 64 / 128, 1-8 blocks per program, 4 / 8 warps, 2 / 3 stages
SWEEP = [dict(block_n=bn, iters=it, num_warps=nw, num_stages=ns)
         for bn, it, nw, ns in itertools.product((64, 128), (1, 2, 4, 8), (4, 8), (2, 3))]


def main() -> None:
    decode_main(__doc__, DEFAULT_CASES, "REQUESTSxCONTEXT[xROWS]", SWEEP, "also time key blocks of 64 / 128, 1-8 blocks per "
                "program, 4 / 8 warps, 2 / 3 stages", run_case,
                f"FP8 keys; us per call (a graph of {LAYERS} calls, median)", COLUMNS)


if __name__ == "__main__":
    main()
