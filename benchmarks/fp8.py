"""Block-scaled FP8 GEMM and FP8 fused MoE on DeepSeek-V3.2 shapes, against the device's measured ceilings.

    python benchmarks/fp8.py [--out fp8.json] [--only gemm,moe,wgmma,tune-gemm,tune-moe] [--experts 256]
                             [--moe-inter 2048 256] [--moe-tokens 1 8 32 4096] [--moe-configs '[null]']

Ceilings, measured in the same run: copy bandwidth (2 GiB device-to-device copy, bytes read + written)
and the FP8 matmul rate of torch._scaled_mm (cuBLAS, per-tensor scales, 8192^3, bf16 out, the faster of
fast and promoted accumulation); per prefill shape _scaled_mm is also timed on the same M, N, K ('vs mm'), and
the GEMM runs three ways: the default (cuBLAS's block-scaled GEMM where it applies, else the Gluon wgmma
kernel), the Gluon kernel (cublas=0) and the Triton kernel (both off); `--only wgmma` times the Gluon
kernel's tiles and the MoE with and without it. Every kernel result is first checked against the
plain-PyTorch reference (dsaserve.ops.fp8 / ops.reference); a failed check stops the run. Times are medians
of CUDA-graph replays with L2 flushed before each (triton.testing.do_bench); 'eager ms' includes launches.
Decode rows are bound by weight bytes (fraction of copy bandwidth, target >= 70%), prefill and 4096-token
MoE rows by FLOPs (fraction of the _scaled_mm rate, target >= 60%). The table is printed last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import triton

if importlib.util.find_spec("dsaserve") is None:  # PYTHONPATH's dsaserve wins (an A/B against a base package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import bench, measure_peaks, rel  # noqa: E402  (benchmarks/kernels.py)

from dsaserve.ops import fp8 as ref  # noqa: E402
from dsaserve.ops import reference  # noqa: E402
from dsaserve.ops.triton import fp8_gemm, moe  # noqa: E402

DEV = "cuda"
BLOCK = (128, 128)
# DeepSeek-V3.2 projections (N out, K in); TP-8 slices of the split ones (q_a and kv_a are replicated).
SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
          "gate/up": (18432, 7168), "down": (7168, 18432),
          "q_b/8": (3072, 1536), "o_proj/8": (7168, 2048), "gate/up/8": (2304, 7168), "down/8": (7168, 2304)}
# Prefill tiles tried by --only tune-gemm (overrides of default_config's M > 512 choice: 128 x 128, 8 warps).
PREFILL_TUNE = [None, dict(num_stages=4), dict(block_n=256), dict(block_n=256, num_stages=4),
                dict(block_m=64, block_n=256, num_warps=4, num_stages=4), dict(block_m=64, block_n=256, num_stages=4),
                dict(num_warps=4, num_stages=4), dict(block_m=64, num_warps=4, num_stages=5), dict(group_m=16),
                dict(block_m=64, num_warps=4, num_stages=3, group_m=32), dict(block_n=64, num_warps=4, num_stages=5)]
MOE_TUNE = [None, dict(num_stages=4), dict(down_block_n=128), dict(block_m=128, num_warps=8),
            dict(block_m=32, num_warps=4), dict(group_m=16), dict(block_m=128, num_warps=8, num_stages=4)]
TRITON = {"cublas": 0, "wgmma": 0}  # forces fp8_linear's Triton kernel
WGMMA_TUNE = [{"cublas": 0, "wgmma": 1, "wgmma_block_m": m, "wgmma_stages": s}
              for m, s in ((64, 3), (64, 4), (128, 3), (128, 4))]
DECODE_M = (1, 4, 16, 32, 64)
PREFILL_M = (256, 1024, 4096, 8192)  # each timed on every path that applies (cuBLAS, Gluon, Triton)
ROWS: list[dict] = []


def measure_ceilings() -> dict[str, float]:
    peaks = measure_peaks()  # copy bandwidth and the bf16 matmul rate
    n = 8192
    a = torch.randn(n, n, device=DEV).to(ref.FP8)
    b = torch.randn(n, n, device=DEV).to(ref.FP8)
    one = torch.ones((), device=DEV)
    for fast in (False, True):  # cuBLAS's FP8 accumulation: promoted (like our kernels) or fast
        ms = bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast))
        peaks[f"fp8_mm_{'fast' if fast else 'precise'}_TFLOPs"] = 2 * n ** 3 / ms / 1e9
    peaks["fp8_mm_TFLOPs"] = max(peaks["fp8_mm_fast_TFLOPs"], peaks["fp8_mm_precise_TFLOPs"])  # the ceiling
    return peaks


def scaled_mm_ms(M: int, N: int, K: int) -> float:
    a = torch.randn(M, K, device=DEV).to(ref.FP8)
    b = torch.randn(N, K, device=DEV).to(ref.FP8)
    one = torch.ones((), device=DEV)
    return bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                          use_fast_accum=True), graph=True)


def record(kind: str, name: str, M: int, ms: float, eager: float, flop: float, nbytes: float, bound: str,
           peaks: dict, err: float, note: str = "", mm_ms: float | None = None) -> None:
    tflops, gbps = flop / ms / 1e9, nbytes / ms / 1e6
    frac = gbps / peaks["copy_GBps"] if bound == "mem" else tflops / peaks["fp8_mm_TFLOPs"]
    row = dict(kind=kind, shape=name, M=M, ms=ms, eager_ms=eager, TFLOPs=tflops, GBps=gbps, bound=bound,
               frac=frac, rel_err=err, note=note, scaled_mm_same_shape_ms=mm_ms)
    ROWS.append(row)
    print(f"  {kind} {name} M={M}: {ms * 1e3:.1f} us, {frac:.0%} of the {bound} ceiling {note}", flush=True)


def check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    err = rel(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol} against the reference"
    return err


def bench_gemm(peaks: dict, shapes: dict[str, tuple[int, int]], rows: tuple[int, ...],
               configs: list[dict | None]) -> None:
    for name, (N, K) in shapes.items():
        w = ref.BlockFP8(*ref.quantize_weight(torch.randn(N, K, device=DEV) * K ** -0.5, BLOCK), BLOCK)
        wbytes = fp8_gemm.weight_bytes(N, K, BLOCK)
        for M in rows:
            x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
            want = ref.linear(x, w)
            mm = scaled_mm_ms(M, N, K) if M > 64 else None
            for cfg in configs:
                try:
                    fn = lambda: fp8_gemm.fp8_linear(x, w, config=cfg)  # noqa: E731
                    err = check(f"fp8_linear {name} M={M} {cfg}", fn(), want, 5e-3)
                    ms, eager = bench(fn, graph=True), bench(fn)
                except AssertionError:
                    raise
                except Exception as exc:  # a tile config that does not fit (tuning): report, go on
                    print(f"  {name} M={M} {cfg} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                chosen = {**fp8_gemm.default_config(M, N, K, BLOCK[1], torch.cuda.get_device_properties(0)
                                                    .multi_processor_count), **(cfg or {})}
                cublas = chosen["cublas"] and fp8_gemm.cublas_applies(x, w)
                note = "cuBLAS block-scaled" if cublas else ",".join(f"{k}={v}" for k, v in chosen.items())
                if not cublas and chosen["wgmma"] and fp8_gemm.fp8_wgmma.applies(x, w):
                    note = f"Gluon wgmma block_m={chosen['wgmma_block_m']} stages={chosen['wgmma_stages']}"
                record("gemm", f"{name} {K}->{N}", M, ms, eager, 2.0 * M * N * K, wbytes + 2 * M * (N + K),
                       "mem" if M <= 64 else "flop", peaks, err, note, mm)
            del want


def bench_moe(peaks: dict, experts: int, tokens: tuple[int, ...], configs: list[dict | None],
              hidden: int = 7168, inter: int = 2048, k: int = 8) -> None:
    gen = torch.Generator(DEV).manual_seed(0)
    w13 = ref.BlockFP8(torch.empty(experts, 2 * inter, hidden, dtype=ref.FP8, device=DEV),
                       torch.rand(experts, 2 * inter // 128, hidden // 128, device=DEV, generator=gen) * 2e-3, BLOCK)
    w2 = ref.BlockFP8(torch.empty(experts, hidden, inter, dtype=ref.FP8, device=DEV),
                      torch.rand(experts, hidden // 128, inter // 128, device=DEV, generator=gen) * 2e-3, BLOCK)
    for e in range(0, experts, 16):  # random e4m3 values, 16 experts at a time (bounded temporaries)
        w13.weight[e:e + 16] = torch.randn(w13.weight[e:e + 16].shape, device=DEV, generator=gen).to(ref.FP8)
        w2.weight[e:e + 16] = torch.randn(w2.weight[e:e + 16].shape, device=DEV, generator=gen).to(ref.FP8)
    for n in tokens:
        x = torch.randn(n, hidden, device=DEV, generator=gen).to(torch.bfloat16)
        ids = torch.rand(n, experts, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
        tw = torch.rand(n, k, device=DEV, generator=gen)
        want = reference.moe_experts(x, w13, w2, ids.long(), tw, n)
        wbytes = moe.weight_bytes(ids, n, hidden, inter, elem=1 + 4 / 128 ** 2)
        for cfg in configs:
            moe.CONFIG = cfg
            try:
                err = check(f"moe fp8 N={n} {cfg}", moe.moe_experts(x, w13, w2, ids, tw, n), want, 1e-2)
                fn = lambda: moe.moe_experts(x, w13, w2, ids, tw, n)  # noqa: E731
                ms, eager = bench(fn, graph=True), bench(fn)
            except AssertionError:
                raise
            except Exception as exc:
                print(f"  moe N={n} {cfg} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            finally:
                moe.CONFIG = None
            record("moe", f"E={experts} top{k} {hidden}x{inter}", n, ms, eager, moe.flops(n, k, hidden, inter),
                   wbytes + 2 * n * hidden * 2, "flop" if n >= 1024 else "mem", peaks, err, str(cfg or ""))
        del want


def print_best() -> None:
    """The fastest config of each tuned shape."""
    best: dict[tuple, dict] = {}
    for r in ROWS:
        key = (r["kind"], r["shape"], r["M"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("\nfastest config per shape:")
    for (kind, shape, M), r in best.items():
        vs_mm = f", {r['scaled_mm_same_shape_ms'] / r['ms']:.0%} of _scaled_mm" if r["scaled_mm_same_shape_ms"] else ""
        print(f"  {kind} {shape} M={M}: {r['ms'] * 1e3:.1f} us, {r['frac']:.0%} of its ceiling{vs_mm}; {r['note']}")


def print_table(peaks: dict) -> None:
    print(f"\n{torch.cuda.get_device_name()}: copy {peaks['copy_GBps']:.0f} GB/s, torch._scaled_mm FP8 "
          f"{peaks['fp8_mm_TFLOPs']:.0f} TFLOP/s (fast accumulation {peaks['fp8_mm_fast_TFLOPs']:.0f}, precise "
          f"{peaks['fp8_mm_precise_TFLOPs']:.0f}; bf16 matmul {peaks['bf16_mm_TFLOPs']:.0f})")
    print(f"{'kind':4s} {'shape':22s} {'M':>5s} {'us':>9s} {'eager us':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'ceiling':>7s} {'frac':>5s} {'target':>6s} {'vs mm':>6s} {'rel err':>8s}  config")
    for r in ROWS:
        target = 0.7 if r["bound"] == "mem" else 0.6
        vs_mm = f"{r['scaled_mm_same_shape_ms'] / r['ms']:6.0%}" if r["scaled_mm_same_shape_ms"] else "     -"
        mark = "ok" if r["frac"] >= target else "below"
        print(f"{r['kind']:4s} {r['shape']:22s} {r['M']:5d} {r['ms'] * 1e3:9.1f} {r['eager_ms'] * 1e3:9.1f} "
              f"{r['TFLOPs']:8.1f} {r['GBps']:7.0f} {('copy' if r['bound'] == 'mem' else 'fp8 mm'):>7s} "
              f"{r['frac']:5.0%} {mark:>6s} {vs_mm} {r['rel_err']:8.1e}  {r['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows and ceilings as JSON")
    ap.add_argument("--experts", type=int, default=256, help="routed experts in the MoE runs (memory: 44 MB each)")
    ap.add_argument("--only", default="gemm,moe",
                    help="any of gemm, moe, wgmma, tune-gemm, tune-moe (wgmma: the Gluon kernel's tiles side by side; "
                         "tune-*: the Triton prefill and 4096-token MoE tiles; decode: fp8_decode.py --sweep)")
    ap.add_argument("--prefill-rows", type=int, nargs="+", default=list(PREFILL_M),
                    help="rows of the prefill-shaped GEMMs (each timed on every path)")
    ap.add_argument("--moe-inter", type=int, nargs="+", default=[2048],
                    help="the experts' intermediate widths in the MoE runs: 2048 whole (one GPU, or expert parallel), "
                         "256 DeepSeek-V3.2's TP-8 slice, 512 its TP-4 slice")
    ap.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 8, 32, 4096], help="token counts of the MoE runs")
    ap.add_argument("--moe-configs", default="[null]",
                    help='JSON list of moe.CONFIG overrides timed side by side, null the defaults, e.g. '
                         '\'[null, {"direct": 0}]\' (the grouped path at decode rows too)')
    a = ap.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    peaks = measure_ceilings()
    print(f"ceilings: copy {peaks['copy_GBps']:.0f} GB/s, _scaled_mm {peaks['fp8_mm_TFLOPs']:.0f} TFLOP/s", flush=True)
    only = set(a.only.split(","))
    if "gemm" in only:
        bench_gemm(peaks, SHAPES, DECODE_M, [None])
        bench_gemm(peaks, SHAPES, tuple(a.prefill_rows), [None, {"cublas": 0}, TRITON])
    if "moe" in only:
        for inter in a.moe_inter:
            bench_moe(peaks, a.experts, tuple(a.moe_tokens), json.loads(a.moe_configs), inter=inter)
    if "tune-gemm" in only:
        prefill = {k: SHAPES[k] for k in ("q_a", "q_b", "kv_a", "o_proj", "gate/up", "down", "gate/up/8", "down/8")}
        bench_gemm(peaks, prefill, (4096,), [{**(c or {}), **TRITON} for c in PREFILL_TUNE])  # the Triton tiles
    if "wgmma" in only:  # the Gluon wgmma kernel against cuBLAS and the Triton kernel, and its grouped MoE
        bench_gemm(peaks, SHAPES, tuple(a.prefill_rows), [None, TRITON] + WGMMA_TUNE)
        bench_moe(peaks, a.experts, (2048, 4096), [None, {"wgmma": 0}, {"wgmma_block_m": 128},
                                                   {"wgmma_stages": 3}, {"wgmma_stages": 5}])
    if "tune-moe" in only:
        bench_moe(peaks, a.experts, (4096,), MOE_TUNE)
    print_best() if only & {"tune-gemm", "tune-moe"} else print_table(peaks)
    print(f"({time.perf_counter() - start:.0f} s)")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "triton": triton.__version__, "ceilings": peaks, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
