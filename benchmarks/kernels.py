"""Time the Triton kernels on DeepSeek-V3.2 shapes against the reference ops and the device's measured peaks.

    python benchmarks/kernels.py [--quick] [--tune] [--kv-cache-dtype bf16|fp8_e4m3|both] [--output-json out.json]

Peaks are measured in the same run, as `dsaserve bench one-batch` measures them (dsaserve/bench/one_batch.py:
a 1 GiB device-to-device copy, bytes read + written, and the bf16 8192^3 GEMM rate). Each row prints the median
time (triton.testing.do_bench, which flushes L2 before every repetition), achieved TFLOP/s and GB/s (the
fewest bytes the op must move), the fraction of the relevant peak and the relative error against the
reference. The reference is timed where it is small enough; 'skip' says where it is not.
--kv-cache-dtype fp8_e4m3 (or both) runs sparse MLA and the indexer over FP8 caches (rows 'mla-fp8', 'idx-fp8':
656-byte latent rows, 132-byte index keys; GB/s counts those bytes) against the reference over the same cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

if importlib.util.find_spec("dsaserve") is None:  # PYTHONPATH's dsaserve wins (an A/B against a base package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsaserve.bench.one_batch import copy_bandwidth, matmul_rate  # noqa: E402
from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops import triton as tops  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = kv_format.FP8
ROWS: list[dict] = []
PROFILE = False


def bench(fn, rep: int = 100, graph: bool = False) -> float:
    """Median ms. graph=True captures one call in a CUDA graph and times its replays, so host launch
    overhead (which a serving engine hides with graphs) stays out; L2 is still flushed before each replay."""
    if graph:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):  # the stream the warm-up made the kernels' scratch for
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def profile(name: str, fn, iters: int = 5) -> None:
    """Per-kernel device time of one call (profiler), to see which stage limits."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    print(f"--- profile {name} ({iters} calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=40))


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp(min=1e-30)).item()


def measure_peaks() -> dict[str, float]:
    """The ceilings `dsaserve bench one-batch` measures: copy bandwidth and the bf16 8192^3 GEMM rate."""
    device = torch.device(DEV)
    return {"copy_GBps": copy_bandwidth(device) / 1e9, "bf16_mm_TFLOPs": matmul_rate(device) / 1e12}


def record(kernel: str, shape: str, ms: float, flop: float, nbytes: float, peaks: dict, bound: str,
           ref_ms: float | None = None, err: float | None = None, note: str = "", eager_ms: float | None = None
           ) -> None:
    tflops = flop / ms / 1e9
    gbs = nbytes / ms / 1e6
    frac = gbs / peaks["copy_GBps"] if bound == "mem" else tflops / peaks["bf16_mm_TFLOPs"]
    row = dict(kernel=kernel, shape=shape, ms=ms, TFLOPs=tflops, GBps=gbs, bound=bound, frac_peak=frac,
               ref_ms=ref_ms, rel_err=err, note=note, eager_ms=eager_ms)
    ROWS.append(row)
    r = f"{ref_ms:9.3f}" if ref_ms is not None else "     skip"
    e = f"{err:.1e}" if err is not None else "-"
    eg = f"{eager_ms:9.4f}" if eager_ms is not None else "        -"
    print(f"{kernel:8s} {shape:34s} {ms:9.4f} {eg} {r} {tflops:7.1f} {gbs:8.0f} {bound:4s} {frac:6.1%} {e:>8s} "
          f"{note}", flush=True)


# ---------------------------------------------------------------- sparse MLA
def bench_mla(peaks: dict, cases: list[tuple[int, int]], configs: list[dict | None], time_ref: bool = True,
              fp8: bool = False) -> None:
    S, K, D, V = 1 << 17, 2048, 576, 512
    kv = torch.randn(S, D, device=DEV).to(BF16)
    name, row_bytes = "mla", None
    if fp8:  # 656-byte rows: e4m3 latent, fp32 scales, bf16 rope
        kv, name, row_bytes = kv_format.quantize_fp8(kv[:, :V], kv[:, V:]), "mla-fp8", kv_format.row_bytes(V, 64, FP8)
    for T, H in cases:
        q = torch.randn(T, H, D, device=DEV).to(BF16)
        idx = torch.randint(0, S, (T, K), device=DEV, dtype=torch.int32)
        scale = D ** -0.5
        ref_ms = err = None
        if T * H <= 128 * 128:
            want, _ = ref.sparse_mla(q, kv, idx, scale, V)
            ref_ms = bench(lambda: ref.sparse_mla(q, kv, idx, scale, V), rep=30) if time_ref else 0.0
        for cfg in configs:
            try:
                tops.mla.CONFIG = cfg
                out, _ = tops.sparse_mla(q, kv, idx, scale, V)
                if ref_ms is not None:
                    err = rel(out, want)
                fn = lambda: tops.sparse_mla(q, kv, idx, scale, V)  # noqa: E731
                ms, eager = bench(fn, graph=True), bench(fn)
                bound = "mem" if H <= 32 else "flop"
                record(name, f"T={T} H={H} K={K} D={D}", ms, tops.mla.flops(T, H, K, D, V),
                       tops.mla.min_bytes(T, H, K, D, V, row_bytes=row_bytes), peaks, bound, ref_ms, err,
                       str(cfg or ""), eager)
            except Exception as exc:  # a tile config that does not fit: report, go on
                print(f"mla      {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        tops.mla.CONFIG = None


# ---------------------------------------------------------------- indexer + top-k
def bench_indexer(peaks: dict, decode: list[tuple[int, int]], prefill: list[tuple[int, int]],
                  configs: list[dict | None], topk: int = 2048, time_ref: bool = True, fp8: bool = False) -> None:
    Hi, Di, page = 64, 128, 64
    name, key_bytes = ("idx-fp8", kv_format.row_bytes(Di, 0, FP8)) if fp8 else ("indexer", None)
    for T, ctx, is_prefill in [(t, c, False) for t, c in decode] + [(t, c, True) for t, c in prefill]:
        B = 1 if is_prefill else T
        pages = ctx // page
        page_table = torch.randperm(B * pages, device=DEV, dtype=torch.int32).reshape(B, pages)
        k_cache = torch.randn(B * pages * page, Di, device=DEV).to(BF16)
        if fp8:
            k_cache = kv_format.quantize_fp8(k_cache)
        q = torch.randn(T, Hi, Di, device=DEV).to(BF16)
        w = torch.randn(T, Hi, device=DEV) * (Hi * Di) ** -0.5
        if is_prefill:  # the last T positions of one request, causal
            row_req = torch.zeros(T, dtype=torch.int32, device=DEV)
            row_len = torch.arange(ctx - T + 1, ctx + 1, dtype=torch.int32, device=DEV)[:, None]
            flop = 2.0 * Hi * Di * row_len.sum().item()
        else:
            row_req = torch.arange(T, dtype=torch.int32, device=DEV)
            row_len = torch.full((T, 1), ctx, dtype=torch.int32, device=DEV)
            flop = tops.indexer.flops(T, Hi, Di, ctx)
        nbytes = tops.indexer.min_bytes(T, Hi, Di, ctx, B, key_bytes=key_bytes)
        args = (q, w, k_cache, page_table, row_req, row_len, page, ctx)
        ref_ms = err = None
        small = (not is_prefill) and T * ctx <= 32 * 32768
        if small:
            want = ref.indexer_logits(*args)
            ref_ms = bench(lambda: ref.indexer_logits(*args), rep=30) if time_ref else 0.0
        kind = "prefill" if is_prefill else "decode"
        for cfg in configs:
            try:
                tops.indexer.CONFIG = cfg
                got = tops.indexer_logits(*args)
                if small:
                    f = torch.isfinite(want)
                    err = rel(got[f], want[f])
                fn = lambda: tops.indexer_logits(*args)  # noqa: E731
                ms, eager = bench(fn, graph=True), bench(fn)
                record(name, f"{kind} T={T} ctx={ctx} Hi={Hi}x{Di}", ms, flop, nbytes, peaks,
                       "flop" if is_prefill else "mem", ref_ms, err, str(cfg or ""), eager)
            except Exception as exc:  # a tile config that does not fit: report, go on
                print(f"indexer  {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        tops.indexer.CONFIG = None
        # top-k on these logits: unsorted torch.topk + slot mapping vs the reference (sorted topk + torch).
        tk_args = (got, row_len, page_table, row_req, page, topk)
        fn = lambda: tops.topk_slots(*tk_args)  # noqa: E731
        ms, eager = bench(fn, graph=True), bench(fn)
        r_ms = bench(lambda: ref.topk_slots(*tk_args), rep=30) if time_ref else None
        same = torch.equal(tops.topk_slots(*tk_args).sort(1).values, ref.topk_slots(*tk_args).sort(1).values)
        record("topk", f"{kind} T={T} L={ctx} k={topk}", ms, 0.0, T * ctx * 4 + T * topk * 4, peaks, "mem",
               r_ms, 0.0 if same else 1.0, "sets equal" if same else "SETS DIFFER", eager)
        del k_cache, got


# ---------------------------------------------------------------- MoE
def bench_moe(peaks: dict, token_counts: list[int], configs: list[dict | None], time_ref: bool = True) -> None:
    E, hidden, inter, k = 32, 7168, 2048, 8  # DeepSeek-V3.2 expert shapes, 32 local experts (EP = 8)
    w13 = (torch.randn(E, 2 * inter, hidden, device=DEV) * hidden ** -0.5).to(BF16)
    w2 = (torch.randn(E, hidden, inter, device=DEV) * inter ** -0.5).to(BF16)
    for n in token_counts:
        x = torch.randn(n, hidden, device=DEV).to(BF16)
        ids = torch.rand(n, E, device=DEV).topk(k, dim=-1).indices.to(torch.int32)
        tw = torch.rand(n, k, device=DEV)
        want = ref.moe_experts(x, w13, w2, ids.long(), tw, n)
        ref_ms = bench(lambda: ref.moe_experts(x, w13, w2, ids.long(), tw, n), rep=30) if time_ref else None
        wbytes = tops.moe.weight_bytes(ids, n, hidden, inter)
        nbytes = wbytes + 2 * n * hidden * 2
        for cfg in configs:
            try:
                tops.moe.CONFIG = cfg
                got = tops.moe_experts(x, w13, w2, ids, tw, n)
                fn = lambda: tops.moe_experts(x, w13, w2, ids, tw, n)  # noqa: E731
                ms, eager = bench(fn, graph=True), bench(fn)
                if PROFILE and n in (1, 32) and cfg is None:
                    profile(f"moe N={n}", fn)
                record("moe", f"N={n} E={E} {hidden}x{inter} top{k}", ms, tops.moe.flops(n, k, hidden, inter), nbytes,
                       peaks, "flop" if n >= 1024 else "mem", ref_ms, rel(got, want), str(cfg or ""), eager)
            except Exception as exc:  # a tile config that does not fit: report, go on
                print(f"moe      {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        tops.moe.CONFIG = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--tune", action="store_true", help="also sweep a few tile configs on key shapes")
    ap.add_argument("--only", default="mla,indexer,moe")
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--profile", action="store_true", help="per-kernel profiler tables for MoE decode")
    ap.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8_e4m3", "both"],
                    help="cache format of the sparse MLA and indexer rows")
    a = ap.parse_args()
    global PROFILE
    PROFILE = a.profile
    torch.manual_seed(0)
    peaks = measure_peaks()
    print(f"device {torch.cuda.get_device_name()}  copy {peaks['copy_GBps']:.0f} GB/s  "
          f"bf16 matmul {peaks['bf16_mm_TFLOPs']:.0f} TFLOP/s", flush=True)
    print(f"{'kernel':8s} {'shape':34s} {'ms':>9s} {'eager ms':>9s} {'ref ms':>9s} {'TFLOP/s':>7s} {'GB/s':>8s} bound "
          f"{'%peak':>6s} {'rel err':>8s} config")
    only = a.only.split(",")
    kv_modes = {"bf16": [False], "fp8_e4m3": [True], "both": [False, True]}[a.kv_cache_dtype]
    if "mla" in only:
        cases = [(1, 16), (32, 16), (128, 16), (4096, 16), (128, 32), (128, 64), (64, 128), (128, 128),
                 (4096, 128)]
        if a.quick:
            cases = [(128, 16), (128, 128)]
        for fp8 in kv_modes:
            bench_mla(peaks, cases, [None], fp8=fp8)
        if a.tune:
            bench_mla(peaks, [(64, 128), (128, 128)], [dict(block_n=32, num_stages=3), dict(block_n=128, num_stages=1)],
                      time_ref=False)
            bench_mla(peaks, [(32, 16), (128, 16), (128, 32)], [dict(gluon=0, num_warps=4), dict(gluon=0, splits=1)],
                      time_ref=False)  # Triton's narrow programs (Hopper's Gluon kernel takes some of these shapes)
    if "indexer" in only:
        decode = [(1, 32768), (32, 4096), (32, 32768), (128, 32768), (32, 131072)]
        prefill = [(4096, 32768)]
        if a.quick:
            decode, prefill = [(32, 32768)], []
        for fp8 in kv_modes:
            bench_indexer(peaks, decode, prefill, [None], fp8=fp8)
        if a.tune:
            bench_indexer(peaks, [(128, 32768)], [], [dict(block_n=128, num_stages=3), dict(num_warps=8)],
                          time_ref=False)
    if "moe" in only:
        counts = [1, 8, 32, 256, 4096] if not a.quick else [1, 4096]
        bench_moe(peaks, counts, [None])
        if a.tune:
            bench_moe(peaks, [4096], [dict(block_k=32, num_stages=5), dict(block_k=64, num_stages=4),
                                      dict(block_k=32, num_stages=5, down_block_k=32, down_num_stages=6),
                                      dict(block_k=32, num_stages=5, group_m=16)], time_ref=False)
            bench_moe(peaks, [1, 32], [dict(block_n=32), dict(block_k=256, num_stages=2),
                                       dict(down_block_n=32, down_block_k=256, down_num_stages=3),
                                       dict(block_n=32, block_k=256, num_stages=3, num_warps=8)], time_ref=False)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "peaks": peaks,
                                                   "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
