"""FlashMLA's SM90 sparse attention kernels side by side with our Triton sparse_mla (Hopper only).

    bash benchmarks/build_flashmla.sh /tmp/fmla
    PYTHONPATH=/tmp/fmla/FlashMLA python benchmarks/flashmla_compare.py [--quick] [--out flashmla.json]

DeepSeek-V3.2 shapes: d_qk 576 (512 latent + 64 rope), d_v 512, 64 or 128 heads, topk 2048 distinct valid slots
per query row.
* decode-fp8: B requests x 1 token over an FP8 cache of 656-byte rows (kv_format.py). FlashMLA's
  flash_mla_with_kvcache reads the paged view [pages, 64, 1, 656] of the very bytes sparse_mla reads, so matching
  outputs show the two layouts are the same. Its scheduler metadata comes from a first, untimed call.
* decode-bf16: those rows dequantized (exactly) into a bf16 cache: sparse_mla vs flash_mla_sparse_fwd (s_q = B),
  FlashMLA's only sparse kernel over bf16 rows.
* prefill: s_q rows over a bf16 kv of s_kv rows: flash_mla_sparse_fwd vs sparse_mla.
Each case first compares the two outputs (and both with dsaserve.ops.reference on the first rows), then times
both as kernels.py does: CUDA-graph replay, median of triton.testing.do_bench, L2 flushed before each replay.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernels.py (which puts the repo root on the path)

Tensor = torch.Tensor
D, V, K, PAGE = 576, 512, 2048, 64
TOL = 2e-2  # relative error (Frobenius) between two bf16 outputs that still counts as agreement
REF_ROWS = 16  # rows checked against the PyTorch reference
ROWS: list[dict[str, Any]] = []


def distinct_indices(rows: int, slots: int, device: str = "cuda") -> Tensor:
    """[rows, K] int32: K distinct random slots in [0, slots) per row, all valid."""
    out = torch.empty(rows, K, dtype=torch.int32, device=device)
    for s in range(0, rows, 1024):  # bounded scratch
        out[s:s + 1024] = torch.rand(min(1024, rows - s), slots, device=device).topk(K, dim=1).indices
    return out


def timed(bench: Callable[..., float], fn: Callable[[], Any]) -> tuple[float, str]:
    """CUDA-graph replay time (ms); eager, with a note, should capture fail."""
    try:
        return bench(fn, graph=True), ""
    except RuntimeError as exc:
        return bench(fn), f"eager (graph capture failed: {str(exc)[:60]})"


def compare(case: str, shape: str, q: Tensor, cache: Tensor, idx: Tensor, scale: float,
            fm_fn: Callable[[], Any], fm_view: Callable[[Any], tuple[Tensor, Tensor]],
            our_fn: Callable[[], tuple[Tensor, Tensor]], note: str = "") -> None:
    """Check ours against FlashMLA and the reference, time both, record and print a row."""
    from kernels import bench, rel
    from dsaserve.cache import kv_format
    from dsaserve.ops import reference as ref
    from dsaserve.ops import triton as tops

    T, H, _ = q.shape
    fm_out, fm_lse = fm_view(fm_fn())
    out, lse = our_fn()
    torch.cuda.synchronize()
    n = min(REF_ROWS, T)
    want, _ = ref.sparse_mla(q[:n], cache, idx[:n], scale, V)
    err, err_ref, fm_err_ref = rel(out, fm_out), rel(out[:n], want), rel(fm_out[:n], want)
    dlse = (lse - fm_lse).abs().max().item()
    if err > TOL or fm_err_ref > TOL:
        note += " MISMATCH" + (": FP8 cache layouts differ?" if cache.dtype == torch.uint8 and err_ref < TOL else "")
    (fm_ms, fm_how), (ms, how) = timed(bench, fm_fn), timed(bench, our_fn)
    note += f" flashmla {fm_how}" * bool(fm_how) + f" ours {how}" * bool(how)
    flop = tops.mla.flops(T, H, K, D, V)
    nbytes = tops.mla.min_bytes(T, H, K, D, V, row_bytes=kv_format.row_bytes(V, D - V, kv_format.FP8)
                                if cache.dtype == torch.uint8 else None)
    row = dict(case=case, shape=shape, T=T, H=H, K=K, flashmla_us=fm_ms * 1e3, ours_us=ms * 1e3,
               flashmla_TFLOPs=flop / fm_ms / 1e9, ours_TFLOPs=flop / ms / 1e9, flashmla_GBps=nbytes / fm_ms / 1e6,
               ours_GBps=nbytes / ms / 1e6, ratio=ms / fm_ms, rel_err_ours_vs_flashmla=err, rel_err_ours_vs_ref=err_ref,
               rel_err_flashmla_vs_ref=fm_err_ref, lse_max_abs_diff=dlse, note=note.strip())
    ROWS.append(row)
    print(f"{case:11s} {shape:26s} {row['flashmla_us']:9.1f} {row['flashmla_TFLOPs']:8.1f} {row['ours_us']:9.1f} "
          f"{row['ours_TFLOPs']:8.1f} {row['ratio']:7.2f} {err:8.1e} {err_ref:8.1e} {fm_err_ref:8.1e} {dlse:7.1e} "
          f"{row['note']}", flush=True)


def bench_decode(flash_mla: Any, batches: list[int], heads: list[int], slots: int) -> None:
    from dsaserve.cache import kv_format
    from dsaserve.ops import triton as tops

    kv = torch.randn(slots, D, device="cuda").to(torch.bfloat16)
    fp8 = kv_format.quantize_fp8(kv[:, :V], kv[:, V:])  # [slots, 656] uint8
    bf16 = kv_format.dequantize_fp8(fp8, V, D - V).to(torch.bfloat16)  # the same values: e4m3 x 2^k is exact in bf16
    del kv
    paged = fp8.view(slots // PAGE, PAGE, 1, fp8.shape[1])  # FlashMLA's [pages, page_size, h_kv, bytes] view
    scale = D ** -0.5
    for H in heads:
        for B in batches:
            q = torch.randn(B, 1, H, D, device="cuda").to(torch.bfloat16)
            idx = distinct_indices(B, slots)
            q3, idx3 = q.view(B, H, D), idx.view(B, 1, K)
            sched, _ = flash_mla.get_mla_metadata()  # filled by the first (untimed) call, then reused

            def fm_fp8() -> tuple[Tensor, Tensor]:
                return flash_mla.flash_mla_with_kvcache(q, paged, None, None, V, sched, softmax_scale=scale,
                                                        is_fp8_kvcache=True, indices=idx3)

            compare("decode-fp8", f"B={B} H={H} S={slots}", q3, fp8, idx, scale, fm_fp8,
                    lambda r: (r[0].view(B, H, V), r[1].reshape(B, H)),
                    lambda: tops.sparse_mla(q3, fp8, idx, scale, V))
            compare("decode-bf16", f"B={B} H={H} S={slots}", q3, bf16, idx, scale,
                    lambda: flash_mla.flash_mla_sparse_fwd(q3, bf16.view(slots, 1, D), idx3, scale, V),
                    lambda r: (r[0], r[2]), lambda: tops.sparse_mla(q3, bf16, idx, scale, V),
                    "flashmla: sparse prefill kernel")


def bench_prefill(flash_mla: Any, cases: list[tuple[int, int]], heads: list[int]) -> None:
    from dsaserve.ops import triton as tops

    scale = D ** -0.5
    for s_q, s_kv in cases:
        kv = torch.randn(s_kv, D, device="cuda").to(torch.bfloat16)
        idx = distinct_indices(s_q, s_kv)
        for H in heads:
            q = torch.randn(s_q, H, D, device="cuda").to(torch.bfloat16)
            compare("prefill", f"s_q={s_q} H={H} s_kv={s_kv}", q, kv, idx, scale,
                    lambda: flash_mla.flash_mla_sparse_fwd(q, kv.view(s_kv, 1, D), idx.view(s_q, 1, K), scale, V),
                    lambda r: (r[0], r[2]), lambda: tops.sparse_mla(q, kv, idx, scale, V))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes: B 1 and 64, s_q 1024, 128 heads")
    ap.add_argument("--only", default="decode,prefill", help="comma list of decode, prefill")
    ap.add_argument("--slots", type=int, default=1 << 17, help="decode cache slots (a multiple of 64)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    try:
        import flash_mla
    except ImportError as exc:
        sys.exit(f"flash_mla is not importable ({exc}). Build it with `bash benchmarks/build_flashmla.sh DEST` "
                 f"and run with PYTHONPATH=DEST/FlashMLA.")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("needs a Hopper GPU (sm_90): FlashMLA was built for its SM90 kernels only")
    if a.slots % PAGE or a.slots < K:
        sys.exit(f"--slots must be a multiple of {PAGE} and at least {K}")
    torch.manual_seed(0)
    heads = [128] if a.quick else [64, 128]
    print(f"device {torch.cuda.get_device_name()}  topk {K}  d_qk {D}  d_v {V}  (us: median, CUDA-graph replay)")
    print(f"{'case':11s} {'shape':26s} {'fm us':>9s} {'fm TF/s':>8s} {'ours us':>9s} {'our TF/s':>8s} {'ours/fm':>7s} "
          f"{'ours~fm':>8s} {'ours~ref':>8s} {'fm~ref':>8s} {'dlse':>7s} note")
    only = a.only.split(",")
    with torch.inference_mode():
        if "decode" in only:
            bench_decode(flash_mla, [1, 64] if a.quick else [1, 16, 64, 132], heads, a.slots)
        if "prefill" in only:
            bench_prefill(flash_mla, [(1024, 8192)] if a.quick else [(1024, 8192), (4096, 32768)], heads)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
