"""The absorbed MLA's per-head products (ops/triton/absorb.py; GPU only, skipped cleanly on CPU or without triton):
W_UK with q_pe's rotary, and W_UV, against exact products and the rotary's reference, on the model's strided views.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.model.rope import Rotary  # noqa: E402
from dsaserve.ops import fp8 as fp8_ref  # noqa: E402
from dsaserve.ops import fused  # noqa: E402
from dsaserve.ops.triton import absorb  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16
NOPE, ROPE, V, LATENT = 128, 64, 128, 512


def _weights(H: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, nope, latent] and W_UV [H, v, latent] as the model views kv_b_proj's weight."""
    w_kv = (torch.randn(H * (NOPE + V), LATENT, device=DEV, generator=gen) * LATENT ** -0.5).to(dtype)
    return w_kv.view(H, NOPE + V, LATENT).split([NOPE, V], dim=1)


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, terms: int) -> bool:
    """got (bf16 or fp32) is the exact product `want` rounded to got's dtype (one unit in the last place: the
    rounding of an fp32 sum near a midpoint may go either way), plus the fp32 sum's error bound (terms x 2^-24
    x the sum of the products' magnitudes: it dominates where the products cancel to near 0). fp32 inputs must
    multiply exactly (TF32 products would miss this bound)."""
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30)))) * torch.finfo(got.dtype).eps
    return bool(((got.double() - want).abs() <= ulp + terms * 2.0 ** -24 * magnitude).all())


CASES = [(T, H, BF16) for T in (1, 3, 16, 32, 64) for H in (16, 32, 128)] + [(3, 16, torch.float32)]


@pytest.mark.parametrize("T,H,dtype", CASES)
def test_absorb_query(T: int, H: int, dtype: torch.dtype):
    """[q_nope W_UK | rotary(q_pe)] for decode rows of few heads in one launch (else the batched GEMM), from q_b's
    output viewed as [T, H, nope + rope]: the latent part within one rounding of the exact product, the rope
    part bit for bit Rotary.apply's in bf16."""
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H)
    w_uk, _ = _weights(H, gen, dtype)
    q = torch.randn(T, H * (NOPE + ROPE), device=DEV, generator=gen).to(dtype).view(T, H, NOPE + ROPE)
    angles = torch.rand(T, ROPE // 2, device=DEV, generator=gen) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = torch.full((T, H, LATENT + ROPE), float("nan"), dtype=dtype, device=DEV)
    assert absorb.query_applies(q, w_uk, cos, sin, out) == absorb.decode_shape(T, H)
    got = fused.absorb_query(q, w_uk, cos, sin, out)
    want = torch.einsum("thd,hdc->thc", q[..., :NOPE].double(), w_uk.double())
    magnitude = torch.einsum("thd,hdc->thc", q[..., :NOPE].double().abs(), w_uk.double().abs())
    assert _within_one_rounding(got[..., :LATENT], want, magnitude, NOPE)
    rope = Rotary.apply(q[..., NOPE:], cos[:, None], sin[:, None], True)
    if dtype == BF16:
        assert torch.equal(got[..., LATENT:], rope)
    else:  # fp32: the kernel may fuse a product and a sum (as the rotary kernel's own test allows)
        torch.testing.assert_close(got[..., LATENT:], rope, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,H,dtype", CASES)
def test_absorb_output(T: int, H: int, dtype: torch.dtype):
    """o_lat W_UV^T per head for decode rows of few heads in one launch (else the batched GEMM), within one rounding
    of the exact product."""
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H + 7)
    _, w_uv = _weights(H, gen, dtype)
    x = torch.randn(T, H, LATENT, device=DEV, generator=gen).to(dtype)
    assert absorb.output_applies(x, w_uv, torch.empty(T, H, V, dtype=dtype, device=DEV)) == absorb.decode_shape(T, H)
    got, none = fused.absorb_output(x, w_uv)
    assert none is None
    want = torch.einsum("thc,hvc->thv", x.double(), w_uv.double())
    magnitude = torch.einsum("thc,hvc->thv", x.double().abs(), w_uv.double().abs())
    assert got.shape == (T, H, V) and _within_one_rounding(got, want, magnitude, LATENT)
    if absorb.decode_shape(T, H):  # the kernel writes every value of a poisoned output, the same ones
        poisoned = torch.full((T, H, V), float("nan"), dtype=dtype, device=DEV)
        assert torch.equal(absorb.absorb_output(x, w_uv, poisoned)[0], got)


@pytest.mark.parametrize("T,H,group", [(1, 16, 128), (9, 16, 128), (32, 16, 64), (4, 32, 128)])
def test_absorb_output_writes_its_rows_quantized(T: int, H: int, group: int):
    """Asked for (the o_proj FP8 GEMM reads them), the launch also writes the [T, H * v] rows quantized: bit for
    bit act_quant of the values it stored, which are within one rounding of the exact product."""
    gen = torch.Generator(DEV).manual_seed(T * 100 + H + group)
    _, w_uv = _weights(H, gen, BF16)
    x = torch.randn(T, H, LATENT, device=DEV, generator=gen).to(BF16)
    got, fp8 = fused.absorb_output(x, w_uv, quant_group=group)
    want = torch.einsum("thc,hvc->thv", x.double(), w_uv.double())
    magnitude = torch.einsum("thc,hvc->thv", x.double().abs(), w_uv.double().abs())
    assert _within_one_rounding(got, want, magnitude, LATENT)
    assert fp8 is not None and fp8.group == group
    want_q, want_s = fp8_ref.act_quant(got.view(T, H * V), group)
    assert torch.equal(fp8.values.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(fp8.scales, want_s)
