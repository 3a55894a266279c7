"""The row glue of dsaserve.ops.fused: the CPU reference path (in-place rotary on strided views) and the
Triton kernels against it on GPU (RMSNorm, rotary, grouped top-k routing), at the model's shapes."""
from __future__ import annotations

import pytest
import torch

from conftest import hadamard_matrix
from dsaserve.model.rope import Rotary
from dsaserve.ops import fp8 as fp8_ref
from dsaserve.ops import fused

BF16 = torch.bfloat16
gpu = pytest.mark.gpu


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The model's former code: rotate the first rope dims, concatenate the rest unchanged."""
    rope = 2 * cos.shape[-1]
    if x.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return torch.cat([Rotary.apply(x[..., :rope], cos, sin, interleaved), x[..., rope:]], -1)


def _rope_inputs(T: int, H: int | None, dim: int, rope: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device).manual_seed(T * 31 + dim)
    shape = (T, H, dim) if H else (T, dim)
    x = torch.randn(*shape, generator=gen, device=device).to(dtype)
    angles = torch.rand(T, rope // 2, generator=gen, device=device) * 6.3
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("H", [None, 4])
def test_rope_in_place_on_a_strided_view_cpu(interleaved: bool, H: int | None):
    x, cos, sin = _rope_inputs(5, H, 128, 64, torch.float32, "cpu")
    want = _rope_reference(x, cos, sin, interleaved)
    out = fused.rope_(x[..., :64], cos, sin, interleaved)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want, rtol=0, atol=0)  # the dims past the rope part are untouched


def _route_inputs(N: int, E: int, device: str, seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(N, E, generator=gen, device=device)
    bias = torch.randn(E, generator=gen, device=device) * 0.1
    return logits, bias


@gpu
@pytest.mark.parametrize("shape", [(1, 7168), (64, 7168), (300, 1536), (17, 512), (3, 100)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rms_norm_kernel(shape: tuple[int, int], dtype: torch.dtype):
    T, n = shape
    gen = torch.Generator("cuda").manual_seed(n)
    wide = torch.randn(T, n + 64, generator=gen, device="cuda").to(dtype) * 3
    x = wide[:, :n]  # a strided view, as the latent slice of kv_a is
    weight = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    out = fused.rms_norm(x, weight, 1e-6)
    want = fused.rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == want.dtype and out.shape == want.shape
    # The fp32 sum's order differs from torch's mean: a row's 1 / rms may differ in its last bit, which
    # moves every fp32 value of the row by an ulp and, in bf16, flips only values next to a rounding tie.
    torch.testing.assert_close(out, want, rtol=2 ** -7 if dtype == BF16 else 1e-6, atol=0)
    if dtype == BF16:
        assert (out != want).float().mean() < 0.01


def test_rope_into_a_slice_leaves_the_input_cpu():
    """The query's rope part is rotated into its slice of the attention query (no concatenation)."""
    x, cos, sin = _rope_inputs(5, 4, 64, 64, torch.float32, "cpu")
    before = x.clone()
    wide = torch.zeros(5, 4, 96)
    out = fused.rope_(x, cos, sin, True, out=wide[..., 32:])
    assert out.data_ptr() == wide[..., 32:].data_ptr() and torch.equal(x, before)
    torch.testing.assert_close(wide[..., 32:], _rope_reference(x, cos, sin, True), rtol=0, atol=0)
    assert not wide[..., :32].any()


def test_add_rms_norm_is_the_add_then_the_norm_cpu():
    gen = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(4, 96, generator=gen) for _ in range(2))
    weight = torch.rand(96, generator=gen) + 0.5
    normed, total, fp8 = fused.add_rms_norm(x, delta, weight, 1e-6, quant_group=32)
    assert fp8 is None  # on CPU the FP8 GEMM's reference quantizes its input itself
    s = x.double() + delta.double()  # an independent float64 reference of the layer's two steps
    want = weight.double() * s / (s.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(total.double(), s, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(normed.double(), want, rtol=1e-5, atol=1e-6)
    normed, same, _ = fused.add_rms_norm(x, None, weight, 1e-6)  # the first layer: nothing to add
    want = weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert same is x
    torch.testing.assert_close(normed.double(), want, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("shape", [(1, 7168), (64, 7168), (300, 1536), (3, 100)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_add_rms_norm_kernel(shape: tuple[int, int], dtype: torch.dtype):
    T, n = shape
    gen = torch.Generator("cuda").manual_seed(n + T)
    x = (torch.randn(T, n, generator=gen, device="cuda") * 3).to(dtype)
    delta = torch.randn(T, n + 8, generator=gen, device="cuda").to(dtype)[:, :n]  # strided, as a split output
    weight = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    normed, total, _ = fused.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)  # the residual rounds as torch's add
    bad = delta.clone()
    bad[0, 1] = float("nan")
    assert fused.add_rms_norm(x, bad, weight, 1e-6)[1][0, 1].isnan()  # a NaN stays NaN, as in torch
    want = fused.rms_norm_reference(x + delta, weight, 1e-6)
    torch.testing.assert_close(normed, want, rtol=2 ** -7 if dtype == BF16 else 1e-6, atol=0)  # see above
    if dtype == BF16:
        assert (normed != want).float().mean() < 0.01


@gpu
@pytest.mark.parametrize("shape,group", [((1, 7168), 128), ((64, 7168), 128), ((5, 1536), 128), ((3, 96), 32),
                                         ((2, 100), 32), ((4, 64), 128), ((1, 48), 12)])
@pytest.mark.parametrize("add", [True, False])
def test_rms_norm_writes_its_rows_quantized(shape: tuple[int, int], group: int, add: bool):
    """Asked for, the norm also writes its stored rows quantized: bit for bit act_quant of what it stored (the
    FP8 GEMM reading them must compute what it computes from the bf16 rows), a last partial group included (the
    tiny models' 64 channels in one 128-block); a group the kernel cannot split its row into: None."""
    T, n = shape
    gen = torch.Generator("cuda").manual_seed(n + T)
    x = (torch.randn(T, n + 8, generator=gen, device="cuda") * 3).to(BF16)[:, :n]  # strided, as q_a's split
    x[0, :group] = 0  # an all-zero group: the amax floor
    delta = torch.randn(T, n, generator=gen, device="cuda").to(BF16) if add else None
    weight = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(BF16)
    normed, _, fp8 = fused.add_rms_norm(x, delta, weight, 1e-6, quant_group=group)
    if group & (group - 1):
        assert fp8 is None
        return
    plain = fused.add_rms_norm(x, delta, weight, 1e-6)[0]  # its tiles sum the squares in another order
    torch.testing.assert_close(normed, plain, rtol=2 ** -7, atol=0)
    assert (normed != plain).float().mean() < 0.01
    want_q, want_s = fp8_ref.act_quant(normed, group)
    assert fp8 is not None and fp8.group == group
    assert torch.equal(fp8.values.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(fp8.scales, want_s)


@gpu
@pytest.mark.parametrize("shape", [(1, 129280), (64, 154880), (3, 100), (2, 4097)])
def test_argmax_kernel(shape: tuple[int, int]):
    """torch.argmax's index, the first of equal maxima included (ties planted across chunks)."""
    B, V = shape
    gen = torch.Generator("cuda").manual_seed(V)
    x = torch.randn(B, V, generator=gen, device="cuda")
    x[0, V // 3] = x[0, V - 1] = 50.0  # equal maxima in different chunks: the first wins
    if B > 1:
        x[1] = float("-inf")  # a fully masked row (grammar): index 0, as torch
        x[-1, 5:9] = 60.0  # equal maxima inside one chunk
    assert torch.equal(fused.argmax(x), x.argmax(-1))
    if B > 2:  # NaN (an overflowed model) counts as the largest in torch: its first index, never past V
        x[0, V // 2] = x[0, V - 2] = float("nan")
        x[2] = float("nan")
        assert torch.equal(fused.argmax(x), x.argmax(-1))


@gpu
@pytest.mark.parametrize("start", [0, 300])
@pytest.mark.parametrize("T", [1, 16, 257])
def test_embed_kernel(start: int, T: int):
    """A vocabulary shard's rows; ids of other shards (below and above) give zero rows."""
    gen = torch.Generator("cuda").manual_seed(T + start)
    weight = torch.randn(300, 7168, generator=gen, device="cuda").to(BF16)
    ids = torch.randint(0, 900, (T,), generator=gen, device="cuda")
    ids[0] = start  # the shard's first and last rows
    ids[-1] = start + 299
    want = torch.zeros(T, 7168, dtype=BF16, device="cuda")
    own = (ids >= start) & (ids < start + 300)
    want[own] = weight[ids[own] - start]
    assert torch.equal(fused.embed(ids, weight, start), want)
    assert torch.equal(fused.embed(ids.int(), weight, start), want)
    strided = torch.stack([ids, ids + 7], dim=1)[:, 0]  # a column of a wider id tensor
    assert torch.equal(fused.embed(strided, weight, start), want)


@gpu
@pytest.mark.parametrize("shape", [(1, 2048), (16, 4608), (130, 18432), (5, 100)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_silu_mul_kernel(shape: tuple[int, int], dtype: torch.dtype):
    T, n = shape
    gen = torch.Generator("cuda").manual_seed(n + T)
    gate_up = (torch.randn(T, 2 * n, generator=gen, device="cuda") * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # the halves of a fused gate/up GEMM: strided rows
    out = fused.silu_mul(gate, up)
    want = torch.nn.functional.silu(gate) * up
    if dtype == BF16:
        assert torch.equal(out, want)  # torch's expf and IEEE division, rounding where torch rounds
    else:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("case", [(1, None, 576), (64, None, 128), (3, 128, 192), (40, 64, 128), (2, 5, 64)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rope_kernel_equals_reference(case: tuple[int, int | None, int], interleaved: bool, dtype: torch.dtype):
    T, H, dim = case
    x, cos, sin = _rope_inputs(T, H, dim, 64, dtype, "cuda")
    view = x[..., dim - 64:] if dim == 576 else x[..., :64]  # k_pe sits at the end of kv_a, q's rope first
    want = x.clone()
    want_view = want[..., dim - 64:] if dim == 576 else want[..., :64]
    want_view.copy_(_rope_reference(want_view, cos, sin, interleaved))
    fused.rope_(view, cos, sin, interleaved)
    if dtype == BF16:
        assert torch.equal(x, want)  # every product rounds to bf16 where the reference's ops round
    else:  # fp32: the compiler contracts a product and the sum into one FMA (one rounding fewer)
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("case", [(1, 256, 8, 4, 8), (64, 256, 8, 4, 8), (500, 256, 8, 4, 8), (9, 256, 1, 1, 8),
                                  (33, 16, 4, 2, 4), (5, 64, 1, 1, 6)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_route_kernel_equals_reference(case: tuple[int, int, int, int, int], normalize: bool, shared: bool):
    N, E, n_group, topk_group, k = case
    logits, bias = _route_inputs(N, E, "cuda", seed=N + E)
    ids, weights = fused.route(logits, bias, n_group, topk_group, k, normalize, 2.5, shared)
    want_ids, want_weights = fused.route_reference(logits, bias, n_group, topk_group, k, normalize, 2.5, shared)
    assert ids.shape == (N, k + shared) and ids.dtype == want_ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)  # the same experts in the same (descending) order
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-7)


@gpu
@pytest.mark.parametrize("rows,n,k", [(1, 256, 7168), (4, 64, 7168), (3, 17, 6144), (2, 8, 100), (8, 256, 7168),
                                      (9, 256, 7168), (17, 256, 7168), (64, 256, 7168), (300, 64, 7168),
                                      (33, 17, 6144)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_linear_fp32_kernel_equals_float64(rows: int, n: int, k: int, dtype: torch.dtype, w_dtype: torch.dtype):
    """The router's logits (bf16 weight) and the indexer's head weights (fp32 weight): fp32 products of the rows,
    times a scale, against float64 (the tensor cores from 9 rows of bf16 times bf16; torch past 16 rows of
    anything else); a row's value does not depend on the rows beside it (batch-invariant) in either kernel."""
    from dsaserve.ops.triton import linear
    gen = torch.Generator("cuda").manual_seed(rows * n)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=gen).to(w_dtype)
    tensor_cores = dtype == w_dtype == torch.bfloat16 and rows >= linear.DOT_MIN_ROWS
    assert linear.linear_fp32_applies(x, w) == (rows <= linear.FP32_LINEAR_MAX_ROWS or tensor_cores)
    got = fused.linear_fp32(x, w, 0.125)
    want = (x.double() @ w.double().T) * 0.125
    if tensor_cores:  # (fp32 accumulation in the tensor cores: a few ulps more)
        assert (got.double() - want).abs().max() <= 4e-6 * want.abs().max()
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    if tensor_cores:  # the same rows at other offsets of the kernel's row tile, with other rows beside them
        size = linear.DOT_MIN_ROWS
        for first in {0, min(5, rows - size), rows - size}:
            assert torch.equal(linear.linear_fp32(x[first:first + size], w, 0.125), got[first:first + size])
    elif rows <= linear.FP32_LINEAR_MAX_ROWS:
        alone = torch.cat([linear.linear_fp32(x[r:r + 1], w, 0.125) for r in range(rows)])
        assert torch.equal(got, alone)


def _align_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids grouped by expert (stable), each run padded to block_m with P; the expert of each row block."""
    P = ids.numel()
    max_blocks = -(-P // block_m) + min(num_experts, P)
    sorted_ids = torch.full((max_blocks * block_m,), P, dtype=torch.int32)
    block_expert = torch.full((max_blocks,), -1, dtype=torch.int32)
    row = 0
    for e in range(num_experts):
        pairs = (ids.cpu() == e).nonzero().flatten()
        if len(pairs):
            sorted_ids[row:row + len(pairs)] = pairs.to(torch.int32)
            blocks = -(-len(pairs) // block_m)
            block_expert[row // block_m:row // block_m + blocks] = e
            row += blocks * block_m
    return sorted_ids, block_expert


@gpu
@pytest.mark.parametrize("case", [(1, 16, 16), (16, 256, 64), (37, 5, 16), (100, 8, 128), (255, 5, 16), (256, 256, 16),
                                  (512, 256, 16), (3000, 8, 64), (65536, 256, 64)])
def test_moe_align_kernel(case: tuple[int, int, int]):
    from dsaserve.ops.triton.moe_align import SMALL_PAIRS, align
    P, E, block_m = case
    gen = torch.Generator("cuda").manual_seed(P)
    ids = torch.randint(0, E, (P,), generator=gen, device="cuda")
    if P > 100:
        ids[: P // 4] = 3  # one crowded expert, as real routing has
    sorted_ids, block_expert, max_blocks = align(ids, E, block_m)
    want_ids, want_blocks = _align_reference(ids, E, block_m)
    assert max_blocks == len(want_blocks) and torch.equal(block_expert.cpu(), want_blocks)
    if P <= SMALL_PAIRS:  # one program, a sort: the runs in pair order
        assert torch.equal(sorted_ids.cpu(), want_ids)
    # within a run the order is the atomics' (any order gives the same outputs): compare each run as a set
    got, want = sorted_ids.cpu().view(-1, block_m), want_ids.view(-1, block_m)
    for e in range(-1, E):
        run = want_blocks == e
        assert torch.equal(got[run].flatten().sort().values, want[run].flatten().sort().values), f"expert {e}"


@pytest.mark.parametrize("n", [2, 32, 128])
def test_hadamard_reference_is_x_times_the_hadamard_matrix(n: int):
    x = torch.randn(6, 3, n, generator=torch.Generator().manual_seed(n))
    got = fused.hadamard_reference(x)
    want = x.double() @ hadamard_matrix(n)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert torch.equal(fused.hadamard_reference(x[2:3, 1]), got[2:3, 1]), "a row alone rotates as in a batch"
    assert fused.hadamard_reference(x.to(BF16)).dtype == BF16
    with pytest.raises(ValueError, match="power-of-two width, got 96"):
        fused.hadamard_reference(torch.zeros(2, 96))


@pytest.mark.parametrize("H", [None, 4])
def test_rope_hadamard_is_rope_then_the_rotation_cpu(H: int | None):
    x, cos, sin = _rope_inputs(5, H, 128, 64, torch.float32, "cpu")
    want = _rope_reference(x, cos, sin, False).double() @ hadamard_matrix(128)
    got = fused.rope_hadamard_(x, 64, cos, sin, False)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@gpu
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("case", [(1, 64), (3, 64), (17, None), (1, None), (40, 8), (2, 20)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float16])
def test_rope_hadamard_kernel_equals_reference(case: tuple[int, int | None], interleaved: bool, dtype: torch.dtype):
    """The indexer's query [T, 64, 128] and key [T, 128] rows (and a partial block of 20 heads): one launch, bit
    for bit the rotary kernel then hadamard_reference."""
    T, H = case
    x, cos, sin = _rope_inputs(T, H, 128, 64, dtype, "cuda")
    kernels = fused._kernels()
    assert kernels.hadamard_applies(x) and kernels.rope_applies(x[..., :64], cos, sin, x[..., :64])  # one launch
    want = x.clone()
    fused.rope_(want[..., :64], cos, sin, interleaved)  # the rotary kernel (held to its reference above)
    want = fused.hadamard_reference(want.cpu())
    got = fused.rope_hadamard_(x, 64, cos, sin, interleaved)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got.cpu(), want)
