"""Sparse MLA at decode and MTP-verify rows as a step runs it: a CUDA graph of back-to-back `sparse_mla` calls,
each over its own FP8 latent cache (656-byte rows: e4m3 latent, fp32 scales, bf16 rope), a 2,048-wide selection
with each row's valid slots first (`context` of them, the rest -1) and per-row lengths, as the model's layers
are. Cases ROWSxHEADSxCONTEXT: a `--tp 8` rank holds 16 of V3.2's 128 heads; an MTP verify step at batch B has
B x (S + 1) rows. Prints us per call (split-KV kernel and its combine) and the fraction of copy bandwidth
measured in the same run on the latent bytes read; every swept config's output is checked against the
default's, the default's against the reference.

    python benchmarks/mla_decode.py [--cases 1x16x1040 4x16x1040 ...] [--sweep] [--output-json out.json]
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
from dsaserve.ops.triton import mla  # noqa: E402
from fp8_decode import decode_main, time_configs  # noqa: E402  (each config: a graph of the calls, us per call)

V_DIM, ROPE, WIDTH, LAYERS = 512, 64, 2048, 61
# decode at batch 1 / 4 / 16 / 32 / 64 and MTP verify (S = 3) at batch 1 / 2 / 4 on a --tp 8 rank, at 1K context and
# at 4K (every row 2,048 selected keys); 64 heads: a --tp 2 rank; 128 heads: one device
DEFAULT_CASES = ["1x16x1040", "4x16x1040", "8x16x1040", "16x16x1040", "64x16x1040", "4x16x4096", "16x16x4096",
                 "32x16x4096", "64x16x4096", "2x64x1040", "1x128x1040", "4x128x1040"]
ROW_BYTES = kv_format.row_bytes(V_DIM, ROPE, kv_format.FP8)

# The table's columns before the timings: result key, header, format.
COLUMNS = [("rows", "rows", "d"), ("heads", "heads", "d"), ("context", "context", "d"),
           ("latent_MB", "latent MB", ".2f")]


def layers(rows: int, heads: int, context: int, gen: torch.Generator, count: int = LAYERS) -> list[tuple]:
    """`count` argument tuples of sparse_mla, one cache each (slots: rows x context, random order)."""
    dev, slots = gen.device, rows * context
    out = []
    for _ in range(count):
        latent = torch.randn(slots, V_DIM + ROPE, device=dev, generator=gen).to(torch.bfloat16)
        cache = kv_format.quantize_fp8(latent[:, :V_DIM], latent[:, V_DIM:])
        indices = torch.full((rows, WIDTH), -1, dtype=torch.int32, device=dev)
        keys = min(context, WIDTH)
        indices[:, :keys] = torch.randperm(slots, device=dev, generator=gen, dtype=torch.int32)[:rows * keys].reshape(
            rows, keys)
        q = torch.randn(rows, heads, V_DIM + ROPE, device=dev, generator=gen).to(torch.bfloat16)
        lengths = torch.full((rows, 1), keys, dtype=torch.int32, device=dev)
        out.append((q, cache, indices, (V_DIM + ROPE) ** -0.5, V_DIM, lengths))
    return out


def run_case(rows: int, heads: int, context: int, configs: list[dict | None], copy_Bps: float,
             gen: torch.Generator) -> dict:
    calls = layers(rows, heads, context, gen)
    mla.CONFIG = None
    base, _ = mla.sparse_mla(*calls[0])
    want, _ = ref.sparse_mla(*calls[0])
    err = ((base.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, f"the default's output is off the reference by {err:.2e}"
    latent_bytes = rows * min(context, WIDTH) * ROW_BYTES

    def check(got: torch.Tensor, base: torch.Tensor) -> None:
        assert torch.allclose(got.float(), base.float(), rtol=2e-2, atol=2e-2), "outputs differ"

    timed = time_configs(f"{rows}x{heads}x{context}", mla, configs, lambda: mla.sparse_mla(*calls[0])[0], check,
                         [functools.partial(mla.sparse_mla, *args) for args in calls], latent_bytes, copy_Bps)
    return {"rows": rows, "heads": heads, "context": context, "latent_MB": latent_bytes / 1e6, **timed}


# --sweep: the combine over 64 / 128 / 512 columns at the default split count and at 16 / 32 / 64 splits, and 2 / 4 /
# 8 splits (Hopper's Gluon kernel runs one program per SM, where the narrow rule aims at three: from 17 rows of 16
# heads the default gives it two to four waves, one needs fewer splits); Triton's 16-head FP8 loop (which Hopper
# runs below mla.GLUON_NARROW_FP8_MIN_ROWS rows only, so forced here) with and without its hand prefetch, at 1 / 2 / 3
# programs per SM
SWEEP = [{k: v for k, v in dict(combine_block_v=c, splits=s).items() if v is not None}
         for c, s in itertools.product((64, 128, 512), (None, 16, 32, 64))] + [dict(splits=s) for s in (2, 4, 8)]
SWEEP += [dict(gluon=0, prefetch=0, num_warps=4)] + [dict(gluon=0, prefetch=1, programs_per_sm=n) for n in (1, 2, 3)]


def main() -> None:
    decode_main(__doc__, DEFAULT_CASES, "ROWSxHEADSxCONTEXT", SWEEP, "also time the combine over 64 / 128 / 512 "
                "columns at the default and at 16 / 32 / 64 splits, and the 16-head FP8 loop's prefetch rule", run_case,
                f"FP8 latent cache; us per call (a graph of {LAYERS} calls, median)", COLUMNS)


if __name__ == "__main__":
    main()
