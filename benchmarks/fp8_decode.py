"""FP8 GEMM at decode rows, timed the way the engine runs it: one CUDA graph of back-to-back calls over
distinct weight copies (more bytes than L2 holds, so every call reads its weight from HBM), time per call;
up to fp8_gemm.QUANTIZED_INPUT_MAX_M rows x comes quantized (xq), as the engine's norms hand it over.

    python benchmarks/fp8_decode.py [--sweep] [--out fp8_decode.json]

Ceilings measured in the same run: copy bandwidth (benchmarks/kernels.py) and, as a reference kernel on the
same shapes, cuBLAS bf16 `F.linear` timed the same way (it reads twice the bytes). Every config is checked
against the plain-PyTorch reference first. `--sweep` also times a grid of tile configs per shape and reports
the best (how fp8_gemm.default_config's decode rules were chosen). The table is printed last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import measure_peaks  # noqa: E402

from dsaserve.ops import fp8 as ref  # noqa: E402
from dsaserve.ops.triton import fp8_gemm  # noqa: E402
from dsaserve.ops.triton._common import next_pow2  # noqa: E402

BLOCK = (128, 128)
SHAPES = {"q_a": (1536, 7168), "kv_a": (576, 7168), "q_b/8": (3072, 1536), "o_proj/8": (7168, 2048),
          "gate/up/8": (2304, 7168), "down/8": (7168, 2304), "o_proj": (7168, 16384), "gate/up": (18432, 7168),
          "wk": (128, 7168), "q_a+wk+kv_a": (2240, 7168), "gate+up/8": (4608, 7168)}  # the last two: fused GEMMs
ROWS = (1, 16, 64)


def chain_us(calls: list[Callable[[], object]]) -> float:
    """Microseconds per call of one graph replaying every call in order."""
    for call in calls:
        call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the stream the warm-up made the kernels' scratch for
        for call in calls:
            call()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median") / len(calls)


def time_configs(label: str, module: object, configs: list[dict | None], first: Callable[[], torch.Tensor],
                 check: Callable[[torch.Tensor, torch.Tensor], None], calls: list[Callable[[], object]],
                 nbytes: float, copy_Bps: float) -> dict:
    """Each config (None: the kernel's default) set as module.CONFIG: `first()`'s output checked against the
    default's (`check(got, default)` raises where they differ), then us per call of a graph of `calls` and
    the fraction of copy bandwidth on `nbytes`; a config that fails or differs is reported and skipped."""
    module.CONFIG = None
    base = first()
    results = []
    for cfg in configs:
        module.CONFIG = cfg
        try:
            check(first(), base)
            us = chain_us(calls)
        except Exception as exc:  # a tile config that does not fit: report, go on
            print(f"{label} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        finally:
            module.CONFIG = None
        results.append({"config": cfg, "us": us, "of_copy": nbytes / (us * 1e-6) / copy_Bps})
    default = next(r for r in results if r["config"] is None)
    best = min(results, key=lambda r: r["us"])
    return {"default_us": default["us"], "default_of_copy": default["of_copy"], "best_us": best["us"],
            "best_config": best["config"], "swept": results}


def run_cases(cases: list[str], run_case: Callable[..., dict], configs: list[dict | None], title: str,
              columns: list[tuple[str, str, str]], output_json: str | None) -> list[dict]:
    """run_case(*the ints of an 'AxBxC' case, configs, copy_Bps, generator) per case, the copy bandwidth measured
    first; then a table (columns: result key, header, format spec) and the JSON of every result."""
    from dsaserve.bench.one_batch import copy_bandwidth
    copy_Bps = copy_bandwidth(torch.device("cuda"))
    gen = torch.Generator("cuda").manual_seed(0)
    results = [run_case(*map(int, c.split("x")), configs, copy_Bps, gen) for c in cases]
    print(f"{torch.cuda.get_device_name()}; copy {copy_Bps / 1e12:.2f} TB/s; {title}")
    columns = columns + [("default_us", "default us", ".2f"), ("default_of_copy", "of copy", ".1%"),
                         ("best_us", "best us", ".2f")]
    widths = [max(len(header), 7) for _, header, _ in columns]
    print(" ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)) + "  best")
    for r in results:
        print(" ".join(f"{r[key]:>{w}{fmt}}" for (key, _, fmt), w in zip(columns, widths))
              + f"  {r['best_config'] or 'default'}")
    if output_json:
        Path(output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_Bps": copy_Bps,
                                                 "cases": results}, indent=1))
    return results


def decode_main(doc: str, cases: list[str], case_form: str, sweep: list[dict], sweep_help: str,
                run_case: Callable[..., dict], title: str, columns: list[tuple[str, str, str]]) -> None:
    """The command line of a decode-kernel benchmark (indexer_decode, mla_decode): --cases in `case_form`,
    --sweep (the default config, then `sweep`), --output-json; then run_cases."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=cases, help=case_form)
    ap.add_argument("--sweep", action="store_true", help=sweep_help)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    run_cases(args.cases, run_case, [None] + (sweep if args.sweep else []), title, columns, args.output_json)


def sweep_configs(M: int, N: int, K: int, sms: int) -> list[dict[str, int]]:
    """Strips of 64 / 128 / 256 columns, 3 or 4 stages (up to 16 rows, with x handed over quantized, also 5), and
    every distinct split-K count (at least 2 K groups
    per split, at most 6 programs per SM): what default_config's decode rules were read from. Above 16 rows
    also row tiles of 16 (each re-reads the weight strip from L2) or the whole batch, quantizing x inside the
    GEMM or in a launch before it, and 8 warps, with split counts that give 1-3 programs per SM."""
    groups = triton.cdiv(K, BLOCK[1])
    tiles_m = (16,) if M <= 16 else (16, next_pow2(M))
    quant = (1,) if M <= 16 else (0, 1)
    out = []
    stages = (3, 4, 5) if M <= 16 else (3, 4)
    for block_n, num_stages, block_m, a_quant in itertools.product((64, 128, 256), stages, tiles_m, quant):
        tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
        warps = (8,) if block_n == 256 else (4, 8) if block_m >= 64 and block_n == 128 else (4,)
        for per in sorted({triton.cdiv(groups, s) for s in range(1, groups + 1)}, reverse=True):
            splits = triton.cdiv(groups, per)
            few = M <= 16 or sms <= tiles * splits <= 3 * sms or splits == 1
            if (per >= 2 or groups == 1) and tiles * splits <= 6 * sms and few:
                out += [dict(gemv=0, block_n=block_n, block_m=block_m, a_quant=a_quant, num_warps=w,
                             num_stages=num_stages, splits=splits) for w in warps]  # (gemv 0: the tiles at 1 row too)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configs per shape")
    ap.add_argument("--out", default=None, help="write the rows and ceilings as JSON")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=list(ROWS), help="activation rows (M) to time")
    args = ap.parse_args()
    copy = measure_peaks()["copy_GBps"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        wbytes = fp8_gemm.weight_bytes(N, K, BLOCK)
        copies = max(4, min(48, (400 << 20) // wbytes))
        weights = [ref.BlockFP8(*ref.quantize_weight(torch.randn(N, K, device="cuda") * K ** -0.5, BLOCK), BLOCK)
                   for _ in range(copies)]
        bf16 = [(torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16) for _ in range(max(4, copies // 2))]
        for M in args.rows:
            x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
            xq = (ref.QuantizedRows(*fp8_gemm.act_quant(x, BLOCK[1]), BLOCK[1])
                  if M <= fp8_gemm.QUANTIZED_INPUT_MAX_M else None)
            want = ref.linear(x, weights[0]).float()
            cublas = chain_us([lambda w=w: F.linear(x, w) for w in bf16])
            timed: list[tuple[float, dict | None]] = []
            for cfg in [None] + (sweep_configs(M, N, K, sms) if args.sweep else []):
                try:
                    got = fp8_gemm.fp8_linear(x, weights[0], config=cfg, xq=xq).float()
                    err = ((got - want).norm() / want.norm()).item()
                    assert err < 5e-3, f"{name} M={M} {cfg}: relative error {err:.1e} against the reference"
                    timed.append((chain_us([lambda w=w: fp8_gemm.fp8_linear(x, w, config=cfg, xq=xq) for w in weights]),
                                   cfg))
                except triton.runtime.errors.OutOfResources as exc:  # a sweep tile that does not fit
                    print(f"  {name} M={M} {cfg}: {exc}")
            default_us = timed[0][0]
            best_us, best_cfg = min(timed, key=lambda t: t[0])
            rows.append(dict(shape=name, N=N, K=K, M=M, us=default_us, frac_copy=wbytes / default_us / 1e3 / copy,
                             cublas_bf16_us=cublas, speedup_vs_cublas_bf16=cublas / default_us,
                             config=fp8_gemm.default_config(M, N, K, BLOCK[1], sms), best_us=best_us,
                             best_config=best_cfg, swept=[dict(us=t, **c) for t, c in timed[1:]]))
        del weights, bf16
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s; FP8 GEMM us per call in a graph of back-to-back "
          f"calls")
    print(f"{'shape':10s} {'N x K':>12s} {'M':>3s} {'us':>7s} {'of copy':>8s} {'bf16 cuBLAS us':>15s} {'speed-up':>9s}"
          + ("  best us (config)" if args.sweep else ""))
    for r in rows:
        best = f"  {r['best_us']:.1f} ({r['best_config'] or 'default'})" if args.sweep else ""
        print(f"{r['shape']:10s} {r['N']:>5d} x {r['K']:<5d} {r['M']:>3d} {r['us']:7.1f} {r['frac_copy']:8.0%} "
              f"{r['cublas_bf16_us']:15.1f} {r['speedup_vs_cublas_bf16']:8.2f}x{best}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_GBps=copy, rows=rows),
                                             indent=1))


if __name__ == "__main__":
    main()
