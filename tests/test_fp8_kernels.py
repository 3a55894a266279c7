"""Triton FP8 kernels vs. their plain-PyTorch reference (dsaserve.ops.fp8), GPU only.

Outputs and intermediates are poisoned (NaN / sentinel) before every run. Activation quantization must
be bit-identical to the reference; GEMM and MoE outputs equal the reference (same quantized operands,
fp32 math) up to accumulation order and the output dtype's rounding.
"""
from __future__ import annotations

import pytest
import torch

# Skips this module without triton or CUDA; `poison` (autouse) makes every output start as NaN / sentinel.
from test_triton_kernels import BF16, DEV, poison, rel_err  # noqa: F401

from dsaserve.ops import fp8 as ref  # noqa: E402
from dsaserve.ops import reference  # noqa: E402
from dsaserve.ops import triton as tops  # noqa: E402
from dsaserve.ops.triton import fp8_gemm, fp8_wgmma  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = {BF16: 5e-3, torch.float32: 1e-3}  # bf16 output rounding ~2e-3; fp32: accumulation order only


def _weight(n: int, k: int, block: tuple[int, int], gen: torch.Generator, experts: int | None = None) -> ref.BlockFP8:
    shape = (n, k) if experts is None else (experts, n, k)
    w = torch.randn(*shape, device=DEV, generator=gen) * k ** -0.5
    w = w * torch.rand(shape[:-2] + (n, 1), device=DEV, generator=gen).mul(4)  # blocks of unequal scales
    return ref.BlockFP8(*ref.quantize_weight(w, block), block)


@pytest.mark.parametrize("M,K,group,dtype", [(1, 7168, 128, BF16), (5, 300, 128, BF16), (33, 48, 128, torch.float32),
                                             (200, 1536, 128, torch.float32), (3, 1000, 64, BF16), (0, 256, 128, BF16)])
def test_act_quant_bit_exact(M: int, K: int, group: int, dtype: torch.dtype) -> None:
    gen = torch.Generator(DEV).manual_seed(M + K)
    x = (torch.randn(M, K, device=DEV, generator=gen) * torch.rand(K, device=DEV, generator=gen) * 10).to(dtype)
    if M > 2:
        x[1] = 0  # an all-zero row: tiny scale, zero values, no NaN
    q, s = fp8_gemm.act_quant(x, group)
    want_q, want_s = ref.act_quant(x, group)
    assert q.dtype == ref.FP8 and s.shape == (M, -(-K // group))
    assert torch.equal(s, want_s), "scales differ from the reference"
    assert torch.equal(q.view(torch.uint8), want_q.contiguous().view(torch.uint8)), "e4m3 values differ"


GEMM_SHAPES = [  # M, N, K: decode and prefill rows; V3.2 projections; odd N / K; N below one tile
    (1, 1536, 7168), (4, 576, 7168), (16, 3072, 1536), (17, 7168, 2048), (64, 2304, 7168), (65, 576, 7168),
    (300, 1000, 1536), (1024, 1536, 7168), (3, 100, 300), (130, 257, 200), (2, 24, 64), (0, 128, 256),
    (1, 7168, 16384), (9, 2240, 7168),  # decode splits of unequal length (o_proj: 7 of 19, 19, ..., 14 groups)
]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_fp8_linear(M: int, N: int, K: int, dtype: torch.dtype) -> None:
    gen = torch.Generator(DEV).manual_seed(M * 7 + N + K)
    w = _weight(N, K, (128, 128), gen)
    x = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    out = fp8_gemm.fp8_linear(x, w, checks=True)
    assert out.shape == (M, N) and out.dtype == dtype
    if M:
        err = rel_err(out, ref.linear(x, w))
        assert err < TOL[dtype], f"fp8_linear M={M} N={N} K={K} {dtype}: rel err {err:.2e}"


def _flipped(xq: ref.QuantizedRows) -> ref.QuantizedRows:
    """xq with every value's sign flipped: a GEMM that reads it gives minus the product."""
    return ref.QuantizedRows((-xq.values.float()).to(ref.FP8), xq.scales, xq.group)


@pytest.mark.parametrize("M,N,K", [(1, 2240, 7168), (9, 3072, 1536), (16, 7168, 2048), (40, 576, 7168),
                                   (64, 2304, 7168), (3, 100, 300), (2, 64, 64)])
def test_fp8_linear_reads_rows_quantized_by_their_producer(M: int, N: int, K: int) -> None:
    """Rows handed over quantized (act_quant's values, as the RMSNorm kernel writes them) give the bits of the
    kernel quantizing x itself, and are really read: the same rows with flipped signs give minus the result."""
    gen = torch.Generator(DEV).manual_seed(M + N + K)
    w = _weight(N, K, (128, 128), gen)
    x = torch.randn(M, K, device=DEV, generator=gen).to(BF16)
    xq = ref.QuantizedRows(*fp8_gemm.act_quant(x, 128), 128)
    out = fp8_gemm.fp8_linear(x, w, checks=True, xq=xq)
    assert torch.equal(out, fp8_gemm.fp8_linear(x, w, checks=True))
    assert torch.equal(fp8_gemm.fp8_linear(x, w, checks=True, xq=_flipped(xq)), -out)
    with pytest.raises(ValueError, match="quantized rows"):
        fp8_gemm.fp8_linear(x[:, :-1], ref.BlockFP8(w.weight[:, :-1], w.scale, w.block), checks=True, xq=xq)


@pytest.mark.parametrize("config", [{"splits": 1}, {"splits": 7}, {"a_quant": 0}, {"a_quant": 1},
                                    {"block_m": 64, "block_n": 128, "splits": 3}, {"block_n": 32, "num_stages": 2},
                                    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}])
@pytest.mark.parametrize("M", [1, 12, 48, 200])
def test_fp8_linear_forced_configs(config: dict[str, int], M: int) -> None:
    """Every tile family and split on the same inputs (including tiles far from the default choice)."""
    gen = torch.Generator(DEV).manual_seed(M)
    w = _weight(700, 1100, (128, 128), gen)
    x = torch.randn(M, 1100, device=DEV, generator=gen).to(BF16)
    err = rel_err(fp8_gemm.fp8_linear(x, w, checks=True, config={"gemv": 0, **config}), ref.linear(x, w))
    assert err < TOL[BF16], f"{config} M={M}: rel err {err:.2e}"


@pytest.mark.parametrize("N,K,block", [(2240, 7168, (128, 128)), (3072, 1536, (128, 128)), (4608, 512, (128, 128)),
                                       (257, 1000, (128, 128)), (100, 300, (64, 64)), (33, 520, (128, 256)),
                                       (24, 64, (32, 32))])
@pytest.mark.parametrize("config", [{}, {"gemv_block_n": 4, "gemv_k": 2048, "gemv_warps": 8},
                                    {"gemv_block_n": 16, "gemv_k": 256}])
def test_one_row_takes_the_gemv(N: int, K: int, block: tuple[int, int], config: dict[str, int]) -> None:
    """A single row runs the GEMV (default_config's tier 0) at any shape, K block and chunk: the reference's product,
    the tile kernel's within the output rounding, the same bits whether it quantizes x or reads the rows
    quantized, and really reading them (flipped signs give minus the result)."""
    gen = torch.Generator(DEV).manual_seed(N + K)
    w = _weight(N, K, block, gen)
    x = torch.randn(1, K, device=DEV, generator=gen).to(BF16)
    assert fp8_gemm.default_config(1, N, K, block[1], 132)["gemv"] == 1
    assert fp8_gemm.default_config(2, N, K, block[1], 132)["gemv"] == 0
    out = fp8_gemm.fp8_linear(x, w, checks=True, config=config)
    assert rel_err(out, ref.linear(x, w)) < TOL[BF16]
    assert rel_err(out, fp8_gemm.fp8_linear(x, w, checks=True, config={"gemv": 0})) < TOL[BF16]
    xq = ref.QuantizedRows(*fp8_gemm.act_quant(x, block[1]), block[1])
    assert torch.equal(fp8_gemm.fp8_linear(x, w, checks=True, config=config, xq=xq), out)
    assert torch.equal(fp8_gemm.fp8_linear(x, w, checks=True, config=config, xq=_flipped(xq)), -out)


@pytest.mark.parametrize("M,N,K,splits", [(1, 7168, 16384, 7), (16, 2240, 7168, 4), (48, 700, 1100, 3),
                                          (5, 96, 1000, 8)])
def test_fp8_linear_split_k_sums_the_partials_in_order(M: int, N: int, K: int, splits: int) -> None:
    """Split-K in one launch: the last program of each tile sums the splits' fp32 partials in split order,
    so the output equals, bit for bit, the unsplit products of each K range added in that order; launch
    after launch (every ticket back at 0) and in CUDA graph replays."""
    gen = torch.Generator(DEV).manual_seed(M + N + splits)
    w = _weight(N, K, (128, 128), gen)
    x = torch.randn(M, K, device=DEV, generator=gen).to(BF16)
    cfg = dict(block_m=16 if M <= 16 else 64, block_n=128, num_warps=4, num_stages=3, group_m=1,
               a_quant=int(M <= 16), cublas=0, wgmma=0, gemv=0)  # the tile kernel at 1 row too
    groups = -(-K // 128)
    per = -(-groups // splits)
    want = torch.zeros(M, N, device=DEV)
    for g in range(0, groups, per):
        ks = slice(g * 128, min((g + per) * 128, K))
        part = ref.BlockFP8(w.weight[:, ks], w.scale[:, g:g + per], w.block)
        want += fp8_gemm.fp8_linear(x[:, ks].float(), part, config={**cfg, "splits": 1})
    want = want.to(BF16)
    assert rel_err(want, ref.linear(x, w)) < TOL[BF16]  # the partials themselves against the reference

    def gemm() -> torch.Tensor:
        return fp8_gemm.fp8_linear(x, w, checks=True, config={**cfg, "splits": splits})

    for _ in range(3):
        assert torch.equal(gemm(), want), "split-K output differs from the in-order sum of the partials"
        assert not _tickets(torch.cuda.current_stream()).any(), "a split-K ticket was not put back to 0"
    graph, capture = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):  # the capturing stream's tickets are made outside the graph
        gemm()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=capture):
        out = gemm()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, want), "a CUDA graph replay of split-K differs"
    torch.cuda.synchronize()
    assert not _tickets(capture).any()


def _tickets(stream: torch.cuda.Stream) -> torch.Tensor:
    with torch.cuda.stream(stream):
        return fp8_gemm._tickets(torch.device(DEV, torch.cuda.current_device()))


def test_split_k_gemms_on_two_streams_keep_their_own_tickets() -> None:
    """Split-K GEMMs running at once on two streams (the indexer's query GEMM on DSAOps.side_stream beside the
    attention's q_b, at decode rows): each stream counts its tiles' partials in tickets of its own, so every
    output equals, bit for bit, the same GEMM run alone (shared tickets let one GEMM's last program sum before
    the other's partials, or never, and leave tiles unwritten)."""
    gen = torch.Generator(DEV).manual_seed(5)
    q_b, wq_b = _weight(3072, 1536, (128, 128), gen), _weight(8192, 1536, (128, 128), gen)  # a TP-8 rank's
    x = torch.randn(1, 1536, device=DEV, generator=gen).to(BF16)
    cfg = dict(splits=6, cublas=0, wgmma=0, gemv=0)  # one row: split-K, not the GEMV
    want_q, want_i = fp8_gemm.fp8_linear(x, q_b, config=cfg), fp8_gemm.fp8_linear(x, wq_b, config=cfg)
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    outs = []
    for _ in range(50):
        torch.cuda._sleep(1_000_000)  # both GEMMs queue behind it and start together: launched one by one from
        # the host, the first would finish before the second starts
        side.wait_stream(main)
        with torch.cuda.stream(side):
            index_q = fp8_gemm.fp8_linear(x, wq_b, config=cfg)
        outs.append((fp8_gemm.fp8_linear(x, q_b, config=cfg), index_q))
        main.wait_stream(side)
    torch.cuda.synchronize()
    for i, (q, index_q) in enumerate(outs):
        assert torch.equal(q, want_q) and torch.equal(index_q, want_i), f"round {i}: a GEMM's output differs"
    assert not _tickets(main).any() and not _tickets(side).any()


@pytest.mark.parametrize("M,N,K", [(256, 1536, 7168), (301, 576, 7168), (300, 1008, 1536), (1030, 24576, 1536),
                                   (4096, 7168, 2048)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_fp8_linear_cublas_block_scaled(M: int, N: int, K: int, dtype: torch.dtype) -> None:
    """Prefill rows on Hopper run cuBLAS's block-scaled GEMM: the reference's function, as the Triton kernel's."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuBLAS block-scaled FP8 is the Hopper prefill path")
    gen = torch.Generator(DEV).manual_seed(M + N + K)
    w = _weight(N, K, (128, 128), gen)
    x = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    assert M >= fp8_gemm.CUBLAS_MIN_M and fp8_gemm.cublas_applies(x, w), "this shape must take the cuBLAS path"
    want = ref.linear(x, w)
    out = fp8_gemm.fp8_linear(x, w, checks=True)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype], f"cuBLAS path: rel err {rel_err(out, want):.2e}"
    triton_out = fp8_gemm.fp8_linear(x, w, checks=True, config={"cublas": 0, "wgmma": 0})
    assert rel_err(triton_out, want) < TOL[dtype], f"Triton path: rel err {rel_err(triton_out, want):.2e}"


@pytest.mark.parametrize("M,N,K", [(96, 1536, 7168), (301, 576, 7168), (300, 1000, 1536), (1030, 24576, 1536),
                                   (4096, 7168, 2304)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_fp8_linear_wgmma(M: int, N: int, K: int, dtype: torch.dtype) -> None:
    """The pipelined Gluon kernel (Hopper): the reference's function, row and column tails included."""
    gen = torch.Generator(DEV).manual_seed(M + N + K)
    w = _weight(N, K, (128, 128), gen)
    x = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    if not fp8_wgmma.applies(x, w):
        pytest.skip("the Gluon wgmma kernel is the Hopper prefill path")
    want = ref.linear(x, w)
    for tiles in ({"wgmma_block_m": 64, "wgmma_stages": 4}, {"wgmma_block_m": 128, "wgmma_stages": 3}):
        out = fp8_gemm.fp8_linear(x, w, checks=True, config={"cublas": 0, "wgmma": 1, **tiles})
        assert out.shape == (M, N) and out.dtype == dtype
        err = rel_err(out, want)
        assert err < TOL[dtype], f"wgmma path {tiles}: rel err {err:.2e}"


def test_fp8_linear_blocks_strides_and_batch_dims() -> None:
    gen = torch.Generator(DEV).manual_seed(11)
    w = _weight(200, 256, (64, 32), gen)  # blocks other than 128 x 128
    base = torch.randn(2, 5, 400, device=DEV, generator=gen).to(BF16)
    x = base[..., 100:356]  # a strided view with two batch dims
    out = fp8_gemm.fp8_linear(x, w, checks=True)
    assert out.shape == (2, 5, 200)
    err = rel_err(out, ref.linear(x.reshape(10, 256), w).view(2, 5, 200))
    assert err < TOL[BF16], f"rel err {err:.2e}"
    with pytest.raises(ValueError, match="K block 8"):
        fp8_gemm.fp8_linear(x, ref.BlockFP8(w.weight, torch.ones(4, 32, device=DEV), (64, 8)))
    with pytest.raises(ValueError, match="needs a scale of"):
        fp8_gemm.fp8_linear(x, ref.BlockFP8(w.weight, w.scale[:, :3].contiguous(), w.block), checks=True)


MOE_CASES = [  # N, num_tokens, hidden, inter, E, k
    (1, 1, 7168, 256, 16, 8),  # decode at V3.2 width (TP-8 expert slice)
    (32, 32, 1024, 256, 32, 8),
    (33, 30, 512, 256, 16, 8),  # padding rows
    (700, 700, 512, 128, 8, 4),  # prefill tiles
    (300, 290, 1024, 256, 4, 2),  # padding rows and tokens
    (200, 200, 384, 256, 8, 2),  # mid tiles
    (50, 47, 200, 128, 5, 3),  # hidden not a multiple of 128
    (8, 0, 256, 128, 4, 2),  # no real token
]


def _moe_inputs(N, hidden, inter, E, k, gen, dtype=BF16):
    x = torch.randn(N, hidden, device=DEV, generator=gen).to(dtype)
    w13 = _weight(2 * inter, hidden, (128, 128), gen, experts=E)
    w2 = _weight(hidden, inter, (128, 128), gen, experts=E)
    ids = torch.rand(N, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
    return x, w13, w2, ids, torch.rand(N, k, device=DEV, generator=gen)


@pytest.mark.parametrize("N,num_tokens,hidden,inter,E,k", MOE_CASES)
def test_moe_experts_fp8(N, num_tokens, hidden, inter, E, k):
    gen = torch.Generator(DEV).manual_seed(N + hidden + inter)
    x, w13, w2, ids, tw = _moe_inputs(N, hidden, inter, E, k, gen)
    got = tops.moe_experts(x, w13, w2, ids, tw, num_tokens)
    want = reference.moe_experts(x, w13, w2, ids.long(), tw, num_tokens)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert (got[num_tokens:] == 0).all(), "padding rows must be 0"
    if num_tokens:
        err = rel_err(got[:num_tokens], want[:num_tokens])
        assert err < 1e-2, f"moe fp8 rel err {err:.2e} >= 1e-2"  # intermediate e4m3 rounding may flip


@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_moe_fp8_forced_tiles(block_m: int) -> None:
    gen = torch.Generator(DEV).manual_seed(block_m)
    x, w13, w2, ids, tw = _moe_inputs(90, 512, 256, 6, 3, gen, dtype=torch.float32)
    want = reference.moe_experts(x, w13, w2, ids.long(), tw, 90)
    for down_n, splits in ((64, 1), (128, 1), (64, 4)):  # hidden 512: 4 K groups, one per split
        tops.moe.CONFIG = {"block_m": block_m, "down_block_n": down_n, "gate_up_splits": splits}
        err = rel_err(tops.moe_experts(x, w13, w2, ids, tw, 90), want)
        assert err < 1e-2, f"block_m={block_m} down_block_n={down_n} splits={splits}: rel err {err:.2e}"


def test_moe_fp8_decode_gate_up_split_k() -> None:
    """Batch 1 on a TP-8 slice of DeepSeek-V3.2's experts (7168 -> 256): the gate/up GEMM would run 16 programs,
    so it splits K; the partial sums equal the reference like the one-launch path, for any split count."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert tops.moe.gate_up_splits(16, 16, 256, 7168, 128, sms, 16) > 1
    assert tops.moe.gate_up_splits(4096, 16, 256, 7168, 128, sms, 16) == 1
    gen = torch.Generator(DEV).manual_seed(11)
    x, w13, w2, ids, tw = _moe_inputs(2, 7168, 256, 16, 8, gen)
    want = reference.moe_experts(x, w13, w2, ids.long(), tw, 2)
    outs = []
    for cfg in (None, {"gate_up_splits": 1}, {"gate_up_splits": 5}):
        tops.moe.CONFIG = cfg
        outs.append(tops.moe_experts(x, w13, w2, ids, tw, 2))
        err = rel_err(outs[-1], want)
        assert err < 1e-2, f"{cfg}: rel err {err:.2e}"
    assert rel_err(outs[0], outs[1]) < 1e-2  # split sums vs one accumulator: only fp32 order and e4m3 flips


def test_moe_fp8_quantizes_x_in_gate_up_bit_identically() -> None:
    """Up to A_QUANT_MAX_PAIRS pairs gate/up quantizes x itself: the same e4m3 values and scales as act_quant,
    so the output equals the act_quant launch's bit for bit."""
    gen = torch.Generator(DEV).manual_seed(12)
    x, w13, w2, ids, tw = _moe_inputs(3, 1152, 256, 16, 8, gen)  # 24 pairs, 9 K groups
    assert 3 * 8 <= tops.moe.A_QUANT_MAX_PAIRS
    outs = []
    for a_quant in (1, 0):
        tops.moe.CONFIG = {"a_quant": a_quant, "gate_up_splits": 1}
        outs.append(tops.moe_experts(x, w13, w2, ids, tw, 3))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("N,num_tokens,hidden", [(1, 1, 7168), (3, 3, 1152), (8, 6, 200), (40, 40, 512)])
def test_moe_fp8_reads_x_quantized_by_its_producer(N: int, num_tokens: int, hidden: int) -> None:
    """As for fp8_linear: x handed over quantized gives the same bits (1-40 tokens: direct and grouped layouts,
    split-K gate/up), and is read (flipped signs: silu(-g) * -u differs, so only inequality is certain)."""
    gen = torch.Generator(DEV).manual_seed(N + hidden)
    x, w13, w2, ids, tw = _moe_inputs(N, hidden, 256, 16, 8, gen)
    xq = ref.QuantizedRows(*fp8_gemm.act_quant(x, 128), 128)
    out = tops.moe_experts(x, w13, w2, ids, tw, num_tokens, xq)
    assert torch.equal(out, tops.moe_experts(x, w13, w2, ids, tw, num_tokens))
    assert not torch.equal(tops.moe_experts(x, w13, w2, ids, tw, num_tokens, _flipped(xq))[:num_tokens],
                           out[:num_tokens])


@pytest.mark.parametrize("N,num_tokens,hidden,E,k", [
    (1, 1, 7168, 16, 8),  # batch 1 on a TP-8 slice: split-K gate/up
    (4, 3, 1152, 4, 3),  # padding row, experts shared between tokens, 9 K groups
    (8, 8, 200, 5, 8),  # hidden not a multiple of 128; 40 pairs, above DIRECT_MAX_PAIRS
])
def test_moe_fp8_direct_equals_grouped_bit_for_bit(N: int, num_tokens: int, hidden: int, E: int, k: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout-free decode path (both GEMMs one M block per pair, in pair order) computes each pair's row as the
    grouped path does: the same bits, with and without split-K, x quantized inside gate/up or before it, and the
    reference's values. int64 ids (torch.topk's, as the router passes them) for one case."""
    gen = torch.Generator(DEV).manual_seed(N + hidden)
    x, w13, w2, ids, tw = _moe_inputs(N, hidden, 256, E, min(k, E), gen)
    ids = ids.long() if N == 4 else ids
    want = reference.moe_experts(x, w13, w2, ids.long(), tw, num_tokens)
    for splits, a_quant in ((1, 1), (3, 1), (3, 0)):
        outs = []
        for direct in (1, 0):
            tops.moe.CONFIG = {"direct": direct, "gate_up_splits": splits, "a_quant": a_quant, "block_m": 16}
            with monkeypatch.context() as m:
                if direct:  # the direct path builds no routing layout
                    m.setattr(tops.moe, "align", None)
                outs.append(tops.moe_experts(x, w13, w2, ids, tw, num_tokens))
        case = f"splits={splits} a_quant={a_quant}"
        assert torch.equal(outs[0], outs[1]), f"{case}: direct and grouped paths differ"
        assert (outs[0][num_tokens:] == 0).all(), "padding rows must be 0"
        err = rel_err(outs[0][:num_tokens], want[:num_tokens])
        assert err < 1e-2, f"{case}: rel err {err:.2e}"


@pytest.mark.parametrize("block_m,dtype", [(64, BF16), (128, BF16), (64, torch.float32)])
def test_moe_fp8_wgmma_forced(block_m: int, dtype: torch.dtype) -> None:
    """The Gluon grouped GEMM at both row tiles equals the reference, as the Triton kernels do."""
    gen = torch.Generator(DEV).manual_seed(block_m + 1)
    x, w13, w2, ids, tw = _moe_inputs(600, 768, 384, 6, 3, gen, dtype=dtype)
    if not (fp8_wgmma.applies(x, w13) and fp8_wgmma.applies(x, w2)):
        pytest.skip("the Gluon wgmma kernel is the Hopper prefill path")
    want = reference.moe_experts(x, w13, w2, ids.long(), tw, 590)
    for cfg in ({"wgmma": 1, "wgmma_block_m": block_m}, {"wgmma": 0}):
        tops.moe.CONFIG = cfg
        got = tops.moe_experts(x, w13, w2, ids, tw, 590)
        assert (got[590:] == 0).all(), "padding rows must be 0"
        err = rel_err(got[:590], want[:590])
        assert err < 1e-2, f"{cfg}: rel err {err:.2e}"


def test_prefill_paths_replay_in_cuda_graphs() -> None:
    """cuBLAS's block-scaled GEMM, the Gluon kernel and the Gluon MoE captured in CUDA graphs (MTP verify
    steps of 96+ rows do this) give their eager results on new inputs."""
    if not fp8_wgmma.works(torch.cuda.current_device()):
        pytest.skip("the cuBLAS / Gluon prefill paths are Hopper's")
    gen = torch.Generator(DEV).manual_seed(5)
    w = _weight(1536, 1024, (128, 128), gen)  # 8 K blocks: cuBLAS applies
    w_odd = _weight(1024, 1152, (128, 128), gen)  # 9 K blocks: the Gluon kernel
    x = torch.randn(128, 1024, device=DEV, generator=gen).to(BF16)
    x_odd = torch.randn(128, 1152, device=DEV, generator=gen).to(BF16)
    mx, w13, w2, ids, tw = _moe_inputs(256, 768, 256, 4, 2, gen)
    assert fp8_gemm.cublas_applies(x, w) and not fp8_gemm.cublas_applies(x_odd, w_odd)

    def step() -> tuple[torch.Tensor, ...]:  # small shapes: the Gluon paths are forced
        return (fp8_gemm.fp8_linear(x, w), fp8_gemm.fp8_linear(x_odd, w_odd, config={"wgmma": 1}),
                tops.moe_experts(mx, w13, w2, ids, tw, 256))

    tops.moe.CONFIG = {"wgmma": 1}
    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, x_odd, mx):
        t.copy_(torch.randn(t.shape, device=DEV, generator=gen))
    graph.replay()
    for got, want in zip(outs, step()):
        assert torch.equal(got, want), "a replay differs from the eager run"


@pytest.mark.parametrize("warm", [True, False])
def test_the_gemm_warm_up_leaves_no_decode_row_count_to_compile(warm: bool) -> None:
    """quant.warm_up_gemms (the start-up's) on DeepSeek-V3.2's decode-time FP8 projections at one `--tp 8` rank
    (the indexer's wq_b, the fused q_a / wk / kv_a, q_b, o_proj), prepared as the engine prepares them; then
    calls at every row count 1-64, with the rows handed over quantized where the module takes them so: nothing
    compiles after the warm-up, and without it those calls compile (the check can tell). Each case in a fresh
    process: Triton keeps what this one compiled. (Written 2026-12-06 after the H100 run of test_cuda_graph's
    eager-MTP test passed with and without the warm-up: the tiny model does not reach the tile a V3.2 rank
    slice compiled after ready.)"""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        compiled = pool.apply(_compiles_during_decode_calls, (warm,))
    assert (compiled == 0) == warm, compiled


def _compiles_during_decode_calls(warm: bool) -> int:
    from torch import nn

    from dsaserve.engine import compiles
    from dsaserve.model import quant
    from dsaserve.ops.fp8 import GEMM_TIER_TOPS, QuantizedRows
    modules = []
    for k, n in ((1536, 8192), (7168, 2240), (1536, 3072), (2048, 7168)):
        lin = quant.Linear(k, n)
        lin.to_fp8((128, 128))
        lin.weight.data, lin.weight_scale_inv.data = ref.quantize_weight(torch.randn(n, k), (128, 128))
        modules.append(lin)
    model = nn.ModuleList(modules).to(DEV)
    quant.prepare(model, "kernels", BF16)
    compiles.starting()
    with torch.inference_mode():
        if warm:
            assert quant.warm_up_gemms(model, GEMM_TIER_TOPS, BF16) > 0
        torch.cuda.synchronize()
        before = compiles.kernel_compiles()
        for m in model:
            for rows in range(1, 65):
                x = torch.randn(rows, m.in_features, device=DEV, dtype=BF16)
                m(x)
                if group := m.input_group(rows):
                    values, scales = ref.act_quant(x, group)
                    m(x, QuantizedRows(values.contiguous(), scales, group))
        torch.cuda.synchronize()
    return compiles.kernel_compiles() - before
