"""The Gluon kernels' (and the decode FP8 GEMM's, the Triton sparse MLA's) machine code for Hopper: compiled
for sm_90a and assembled by Triton's own ptxas (no GPU needed), then checked for what silently costs speed:
ptxas serializing the asynchronous wgmma (warning C7514: the FP8 GEMM's loop until 2026-12-01 lost 2-20% to
it, docs/benchmarks.md), register spills, and for the FP8 GEMMs more than 168 registers per thread (three
CTAs of 128 threads per SM need it)."""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from dsaserve.ops.triton import fp8_gemm, fp8_wgmma, mla_gluon, topk_split  # noqa: E402

FP8 = torch.float8_e4m3fn


def _descriptor(rows: int, cols: int, dtype: torch.dtype, block: list[int], gl_dtype) -> TensorDescriptor:
    t = torch.empty(rows, cols, dtype=dtype)  # host memory: only its shape, strides and alignment matter
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return TensorDescriptor(t, [rows, cols], list(t.stride()), block, layout)


def _ptxas_report(kernel, args: dict, constexprs: dict, num_warps: int, tmp_path, num_stages: int = 3) -> str:
    """args: name -> a TensorDescriptor or a type string ("*fp32" pointers are taken as 16-byte aligned, as
    the launches' tensors are, and "i32:16" integers as multiples of 16, as the launches' strides are).
    A Gluon kernel, or a plain Triton one (compiled with num_stages)."""
    signature = {name: v.split(":")[0] if isinstance(v, str) else mangle_type(v) for name, v in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(args.values())
               if isinstance(v, str) and (v.startswith("*") or v.endswith(":16"))}
    gluon = isinstance(kernel, GluonJITFunction)
    source = (GluonASTSource if gluon else ASTSource)(kernel, signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": num_warps} if gluon else {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    done = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = done.stderr
    assert "C7514" not in report and "serialized" not in report, report
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    return report


@pytest.mark.skipif(fp8_wgmma.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("block_m,stages,grouped", [(64, 3, False), (64, 3, True), (128, 3, False), (64, 4, True)])
def test_wgmma_gemm_is_not_serialized_and_does_not_spill(block_m: int, stages: int, grouped: bool, tmp_path) -> None:
    args = dict(a_desc=_descriptor(4096, 7168, FP8, [block_m, 128], gl.float8e4nv),
                w_desc=_descriptor(2048, 7168, FP8, [128, 128], gl.float8e4nv),
                c_desc=_descriptor(4096, 2048, torch.bfloat16, [block_m, 128], gl.bfloat16),
                AS="*fp32", WS="*fp32", ROW_W="*fp32", BLOCK_EXPERT="*i32", N="i32", K="i32", stride_asg="i32",
                stride_wse="i32", stride_wsn="i32", num_m_blocks="i32")
    constexprs = dict(GROUPED=grouped, ROW_WEIGHT=grouped, STAGES=stages, GROUP_M=8, num_warps=block_m // 16)
    report = _ptxas_report(fp8_wgmma._wgmma_kernel, args, constexprs, block_m // 16, tmp_path)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert registers <= 168, f"{registers} registers: fewer than three 128-thread CTAs fit an SM\n{report}"


@pytest.mark.skipif(mla_gluon.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("fp8,has_len", [(False, False), (False, True), (True, True)])
def test_sparse_mla_is_not_serialized_and_does_not_spill(fp8: bool, has_len: bool, tmp_path) -> None:
    strides = ["stride_qt", "stride_qh", "stride_kv", "stride_kr8", "stride_ks", "stride_it", "stride_len",
               "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh", "stride_ls"]
    unaligned = {"stride_kr8", "stride_ks", "stride_len", "stride_os", "stride_ls", "stride_lt", "stride_lh"}
    args = dict(Q="*bf16", KV="*fp8e4nv" if fp8 else "*bf16", KR="*bf16", KS="*fp32" if fp8 else "*bf16",
                IDX="*i32", LEN="*i32", O="*bf16", LSE="*fp32",
                **{n: "i32" if n in unaligned else "i32:16" for n in strides}, H="i32", K="i32:16",
                num_splits="i32", scale_log2="fp32")
    constexprs = dict(BLOCK_H=mla_gluon.BLOCK_H, BLOCK_N=mla_gluon.BLOCK_N, V_DIM=mla_gluon.V_DIM,
                      R_DIM=mla_gluon.R_DIM, HAS_LEN=has_len, FP8=fp8, num_warps=8)
    _ptxas_report(mla_gluon._sparse_mla_kernel, args, constexprs, 8, tmp_path)


@pytest.mark.parametrize("split_k", [True, False])
def test_decode_fp8_gemm_fits_three_ctas_per_sm(split_k: bool, tmp_path) -> None:
    """The decode FP8 GEMM as fp8_gemm.default_config runs it up to 16 rows (16-row tiles, 128-column strips,
    4 warps, 3 stages): 168 registers at most, or fewer than three CTAs fit an SM and o_proj's 392 programs
    at one row take two waves (int64 split-K tile offsets made it 171)."""
    args = dict(A="*bf16", AS="*bf16", W="*fp8e4nv", WS="*fp32", C="*bf16", P="*fp32", TICKETS="*i32", M="i32",
                N="i32:16", K="i32:16", num_groups="i32", groups_per_split="i32", stride_am="i32:16",
                stride_asm="i32:16", stride_wn="i32:16", stride_wsn="i32", stride_cm="i32:16")
    constexprs = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SCALE_N=128, GROUP_M=1, A_QUANT=True, EVEN_K=True,
                      SPLIT_K=split_k, PDL=True)
    report = _ptxas_report(fp8_gemm._gemm_kernel, args, constexprs, 4, tmp_path, num_stages=3)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert registers <= 168, f"{registers} registers: fewer than three 128-thread CTAs fit an SM\n{report}"


@pytest.mark.parametrize("rank_block", [16, 32])
def test_split_topk_ranking_keeps_its_registers(rank_block: int, tmp_path) -> None:
    """The split top-k's rank kernel: its ranking programs (the common path) set its registers, not the passes
    beside them for many equal keys (with the passes holding 4,096 candidates in registers it took 229, so
    two of its 128-thread CTAs fit an SM where the ranking needs 72-125); the counts kernel's scan of the
    histogram copies stays at most 128."""
    i32 = "i32"
    rank_args = dict(CAND_POS="*i32", CAND_KEY="*i32", LEN="*i32", PT="*i32", REQ="*i32", HIST="*i32", OUT="*i32",
                     STATE="*i32", stride_len=i32, stride_pt=i32, stride_o=i32, stride_c=i32, L=i32, page_size=i32)
    rank_consts = dict(K=2048, CAP=topk_split.CAP, RB=rank_block, JB=topk_split.RANK_SWEEP,
                       PASS_CHUNK=topk_split.PASS_CHUNK, BIN_BITS=topk_split.BIN_BITS, COPIES=topk_split.HIST_COPIES,
                       FIELD=21, PDL=True)
    report = _ptxas_report(topk_split._rank_kernel, rank_args, rank_consts, 4, tmp_path)
    assert int(re.search(r"Used (\d+) registers", report).group(1)) <= 128, report
    count_args = dict(X="*fp32", LEN="*i32", HIST="*i32", COUNTS="*i32", STATE="*i32", stride_x=i32, stride_len=i32,
                      L=i32)
    count_consts = dict(K=2048, CHUNK=topk_split.CHUNK, BIN_BITS=topk_split.BIN_BITS, COPIES=topk_split.HIST_COPIES,
                        PDL=True)
    report = _ptxas_report(topk_split._count_kernel, count_args, count_consts, 4, tmp_path)
    assert int(re.search(r"Used (\d+) registers", report).group(1)) <= 128, report


def test_triton_sparse_mla_prefetch_does_not_spill(tmp_path) -> None:
    """The Triton sparse MLA of a `--tp 8` rank (16 heads, FP8 cache, bf16 queries) as mla._config launches it
    (the row count changes only its split count, a runtime argument): its FP8 gathers prefetched by hand a block
    ahead, at the warps that hold them without spilling (at 4 warps it spilled 580 bytes and ran 25-50% slower,
    docs/benchmarks.md). The strides' divisibility is as the launch's where it matters: the FP8 rows' 656 bytes
    are a multiple of 16, the rope rows' 328 bf16 values are not."""
    from dsaserve.ops.triton import mla

    cfg = mla._config(16, 16, 2048, 512, 1152, 132, fp8=True, hopper=True)
    assert cfg["prefetch"] and cfg["block_h"] == 16
    ints = dict(stride_qt="i32:16", stride_qh="i32:16", stride_kv="i32:16", stride_kr="i32", stride_ks="i32",
                stride_it="i32:16", stride_len="i32", stride_ot="i32:16", stride_oh="i32:16", stride_os="i32",
                stride_lt="i32", stride_lh="i32", stride_ls="i32", H="i32", K="i32:16", V_DIM="i32:16",
                R_DIM="i32:16", num_splits="i32", scale_log2="fp32")
    args = dict(Q="*bf16", KV="*fp8e4nv", KR="*bf16", KS="*fp32", IDX="*i32", LEN="*i32", O="*bf16", LSE="*fp32",
                **ints)
    constexprs = dict(BLOCK_H=16, BLOCK_N=cfg["block_n"], BLOCK_V=512, BLOCK_R=64, PRECISION="tf32", FP8=True,
                      SCALE_BLOCKS=4, HAS_LEN=True, PREFETCH=True, PDL=True)
    _ptxas_report(mla._sparse_mla_kernel, args, constexprs, cfg["num_warps"], tmp_path, num_stages=cfg["num_stages"])


def test_router_product_tile_pipelines_without_spills(tmp_path) -> None:
    """linear_fp32's tensor-core tile (the router's logits past 16 rows) at DeepSeek-V3.2's K: its loads are
    asynchronous copies (a K mask on every load turned them into register loads, no pipelining) and nothing
    spills."""
    from dsaserve.ops.triton import linear
    bm, bn, bk, warps, stages, split = linear.DOT_TILE
    per_split = -(-7168 // bk // split) * bk
    args = {"X": "*bf16", "W": "*bf16", "OUT": "*fp32", "T": "i32", "N": "i32", "K": "i32", "stride_x": "i32:16",
            "stride_w": "i32:16", "stride_o": "i32:16", "stride_split": "i32", "scale": "fp32"}
    constexprs = {"BM": bm, "BN": bn, "BK": bk, "PER_SPLIT": per_split, "EVEN_K": per_split * split == 7168,
                  "PDL": True}
    _ptxas_report(linear._linear_dot_kernel, args, constexprs, warps, tmp_path, stages)
    ptx = (tmp_path / "kernel.ptx").read_text()
    assert "cp.async" in ptx
    assert ("wgmma.mma_async" if bm >= 64 else "mma.sync") in ptx
