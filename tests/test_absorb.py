"""The absorbed MLA's per-head products (ops/triton/absorb.py; GPU only, skipped cleanly on CPU or without triton):
W_UK with q_pe's rotary, and W_UV, against fp32 products and the rotary's reference, on the model's strided views.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.model.rope import Rotary  # noqa: E402
from dsaserve.ops import fused  # noqa: E402
from dsaserve.ops.triton import absorb  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16
NOPE, ROPE, V, LATENT = 128, 64, 128, 512


def _weights(H: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, nope, latent] and W_UV [H, v, latent] as the model views kv_b_proj's weight."""
    w_kv = (torch.randn(H * (NOPE + V), LATENT, device=DEV, generator=gen) * LATENT ** -0.5).to(BF16)
    return w_kv.view(H, NOPE + V, LATENT).split([NOPE, V], dim=1)


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, terms: int) -> bool:
    """got (bf16) is the exact product `want` rounded to bf16 (one unit in the last place: the rounding of an
    fp32 sum near a midpoint may go either way), plus the fp32 sum's error bound (terms x 2^-24 x the sum of the
    products' magnitudes: it dominates where the products cancel to near 0)."""
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30))) - 7)
    return bool(((got.double() - want).abs() <= ulp + terms * 2.0 ** -24 * magnitude).all())


@pytest.mark.parametrize("T", [1, 3, 16, 32, 64])
@pytest.mark.parametrize("H", [16, 32, 128])
def test_absorb_query(T: int, H: int):
    """[q_nope W_UK | rotary(q_pe)] for decode rows of few heads in one launch (else the batched GEMM), from q_b's
    output viewed as [T, H, nope + rope]: the latent part within one rounding of the fp32 product, the rope
    part bit for bit Rotary.apply's."""
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H)
    w_uk, _ = _weights(H, gen)
    q = torch.randn(T, H * (NOPE + ROPE), device=DEV, generator=gen).to(BF16).view(T, H, NOPE + ROPE)
    angles = torch.rand(T, ROPE // 2, device=DEV, generator=gen) * 6.3
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    out = torch.full((T, H, LATENT + ROPE), float("nan"), dtype=BF16, device=DEV)
    assert absorb.query_applies(q, w_uk, cos, out) == absorb.decode_shape(T, H)
    got = fused.absorb_query(q, w_uk, cos, sin, out)
    want = torch.einsum("thd,hdc->thc", q[..., :NOPE].double(), w_uk.double())
    magnitude = torch.einsum("thd,hdc->thc", q[..., :NOPE].double().abs(), w_uk.double().abs())
    assert _within_one_rounding(got[..., :LATENT], want, magnitude, NOPE)
    rope = Rotary.apply(q[..., NOPE:], cos[:, None], sin[:, None], True)
    assert torch.equal(got[..., LATENT:], rope)


@pytest.mark.parametrize("T", [1, 5, 16, 32, 64])
@pytest.mark.parametrize("H", [16, 32, 128])
def test_absorb_output(T: int, H: int):
    """o_lat W_UV^T per head for decode rows of few heads in one launch (else the batched GEMM), within one rounding of
    the fp32 product."""
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H + 7)
    _, w_uv = _weights(H, gen)
    x = torch.randn(T, H, LATENT, device=DEV, generator=gen).to(BF16)
    assert absorb.output_applies(x, w_uv, torch.empty(T, H, V, dtype=BF16, device=DEV)) == absorb.decode_shape(T, H)
    got = fused.absorb_output(x, w_uv)
    want = torch.einsum("thc,hvc->thv", x.double(), w_uv.double())
    magnitude = torch.einsum("thc,hvc->thv", x.double().abs(), w_uv.double().abs())
    assert got.shape == (T, H, V) and _within_one_rounding(got, want, magnitude, LATENT)
