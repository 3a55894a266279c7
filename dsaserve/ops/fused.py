"""Row glue the model calls: RMSNorm (with the residual add fused), rotary, fp32 products (router, indexer
head weights), grouped top-k routing, SiLU-and-multiply, the Hadamard rotation, the embedding lookup, greedy
argmax, the absorbed MLA's per-head products.

Each function is the reference math, and on CUDA one Triton kernel (dsaserve.ops.triton.fused) where its
shape constraints hold; the kernel rounds where this code rounds (tests/test_fused_ops.py holds them equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsaserve.model.rope import Rotary
from dsaserve.ops import invariant
from dsaserve.ops.fp8 import QuantizedRows

Tensor = torch.Tensor


def _kernels():  # imported lazily: needs CUDA + Triton
    from dsaserve.ops.triton import fused
    return fused


def _linear():
    from dsaserve.ops.triton import linear
    return linear


def _absorb():
    from dsaserve.ops.triton import absorb
    return absorb


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """1 / sqrt rather than rsqrt: each correctly rounded, so a row's value does not follow its offset in the
    batch (CPU's vectorized rsqrt rounds apart from its scalar tail; ops/invariant.py)."""
    xf = x.float()
    return weight * (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) over the last dim: fp32 statistics, the normed value rounded to x's dtype."""
    if x.is_cuda:
        return _kernels().rms_norm(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                 quant_group: int = 0) -> tuple[Tensor, Tensor, QuantizedRows | None]:
    """(rms_norm(s), s, fp8) with s = x + delta, the residual add (in x's dtype, as torch adds) fused into the norm
    on CUDA: one launch instead of two. delta None: s = x.

    quant_group > 0 asks for the normed rows quantized as act_quant(rows, quant_group) quantizes them, for the FP8
    GEMM that reads them: written by the same kernel on CUDA; None where it cannot (the GEMM quantizes itself)."""
    if x.is_cuda and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape)):
        group = quant_group if _kernels().pow2_tile(quant_group) else 0
        return _kernels().rms_norm(x, weight, eps, delta, group)
    total = x if delta is None else x + delta
    return rms_norm_reference(total, weight, eps), total, None


def rope_hadamard_(x: Tensor, rope: int, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """In place: rope_ on x[..., :rope], then every whole row [..., n] times H (hadamard_reference): one launch on
    CUDA, bit for bit the rotary kernel followed by hadamard_reference (the same fp32 adds per row)."""
    n = x.shape[-1]
    if x.is_cuda and x.stride(-1) == 1 and _kernels().hadamard_applies(x) and \
            _kernels().rope_applies(x[..., :rope], cos, sin, x[..., :rope]):
        _kernels().rope(x[..., :rope], cos, sin, interleaved, x[..., :rope], row=n)
        return x
    rope_(x[..., :rope], cos, sin, interleaved)
    return x.copy_(hadamard_reference(x))


def rope_index_(x: Tensor, rope: int, cos: Tensor, sin: Tensor, interleaved: bool, hadamard: bool) -> Tensor:
    """In place: the indexer's rotary of x[..., :rope]; with `hadamard` then each whole row times H, the basis
    an FP8 index cache stores its keys in (KVPools.rotates_index_keys), fused into one launch on CUDA."""
    if hadamard:
        return rope_hadamard_(x, rope, cos, sin, interleaved)
    rope_(x[..., :rope], cos, sin, interleaved)
    return x


def rope_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, out: Tensor | None = None) -> Tensor:
    """Rotate x [T, D] or [T, H, D] (Rotary.apply's values and half-split output order) with cos/sin
    [T, D / 2] of each row's position, in place or into `out` (x's shape: a slice of a wider tensor
    saves the copy a concatenation would make); returns the rotated tensor."""
    dest = x if out is None else out
    if x.is_cuda and _kernels().rope_applies(x, cos, sin, dest):
        return _kernels().rope(x, cos, sin, interleaved, dest)
    if x.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return dest.copy_(Rotary.apply(x, cos, sin, interleaved))


def absorb_query(q: Tensor, w_uk: Tensor, cos: Tensor, sin: Tensor, out: Tensor,
                 batch_invariant: bool = False) -> Tensor:
    """The absorbed MLA's query into out [T, H, latent + rope]: q [T, H, nope + rope]'s nope part times each
    head's W_UK [H, nope, latent], then its rope part rotated (interleaved pairs, as q_pe is). One launch on CUDA
    for decode rows; otherwise a batched GEMM and the rotary kernel, each into its slice (no concatenation).
    batch_invariant: each row's product by ops.invariant (deterministic inference)."""
    nope, latent = w_uk.shape[1:]
    if batch_invariant:
        invariant.per_head(q[..., :nope], w_uk, out=out[..., :latent])
    elif q.is_cuda and _absorb().query_applies(q, w_uk, cos, sin, out):
        return _absorb().absorb_query(q, w_uk, cos, sin, out)
    else:
        torch.bmm(q[..., :nope].transpose(0, 1), w_uk, out=out[..., :latent].transpose(0, 1))
    rope_(q[..., nope:], cos, sin, interleaved=True, out=out[..., latent:])
    return out


def absorb_output(x: Tensor, w_uv: Tensor, quant_group: int = 0,
                  batch_invariant: bool = False) -> tuple[Tensor, QuantizedRows | None]:
    """(x [T, H, latent] times each head's W_UV [H, v, latent] transposed -> [T, H, v], fp8): one launch on CUDA for
    decode rows, a batched GEMM writing the [T, H, v] rows directly otherwise. quant_group > 0 asks for the rows
    [T, H * v] quantized as act_quant quantizes them (as add_rms_norm does): from the launch, else None.
    batch_invariant: each row's product by ops.invariant (deterministic inference)."""
    if batch_invariant:
        return invariant.per_head(x, w_uv.transpose(1, 2)), None
    out = x.new_empty(x.shape[0], x.shape[1], w_uv.shape[1])
    if x.is_cuda and _absorb().output_applies(x, w_uv, out):
        group = quant_group if _absorb().quantizes_output(w_uv, quant_group) else 0
        return _absorb().absorb_output(x, w_uv, out, group)
    torch.bmm(x.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
    return out, None


def linear_fp32(x: Tensor, weight: Tensor, scale: float = 1.0, batch_invariant: bool = False) -> Tensor:
    """F.linear(x.float(), weight.float()) * scale (the router's logits from a bf16 weight [N, K], the indexer's
    head weights from an fp32 one); on CUDA one launch where ops.triton.linear applies (the same fp32 products,
    summed in another order).
    batch_invariant: each row's product by ops.invariant (deterministic inference)."""
    if batch_invariant:
        out = invariant.linear(x.float(), weight.float())
        return out * scale if scale != 1.0 else out
    if x.is_cuda and _linear().linear_fp32_applies(x, weight):
        return _linear().linear_fp32(x, weight, scale)
    out = F.linear(x.float(), weight.float())
    return out * scale if scale != 1.0 else out


def route_reference(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, normalize: bool,
                    scale: float, shared: bool = False, local: tuple[int, int] | None = None,
                    batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    N, E = logits.shape
    scores = invariant.pointwise(torch.sigmoid, logits) if batch_invariant else logits.sigmoid()
    choice = scores + bias
    if n_group > 1:
        groups = choice.view(N, n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // n_group, 1), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * scale
    if shared:
        ids = torch.cat([ids, ids.new_full((N, 1), E)], dim=1)
        weights = torch.cat([weights, weights.new_ones(N, 1)], dim=1)
    if local is not None:
        ids = ids - local[0]
        ids = torch.where((ids >= 0) & (ids < local[1]), ids, -1)
    return ids, weights


def route(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, normalize: bool,
          scale: float, shared: bool = False, local: tuple[int, int] | None = None,
          batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """Sigmoid scores of fp32 router logits [N, E]; experts are chosen by score + bias among the
    `topk_group` best groups (a group's value: its two best choices) -> (ids [N, k] int64, weights [N, k]
    fp32: the chosen scores, normalized to sum 1 if `normalize`, times `scale`). shared: one more column,
    expert E with weight 1 (the shared expert stacked after the routed ones: quant.Experts.shared_slot).
    local (first, count): this rank's experts under expert parallelism; ids come out relative to `first`, and
    -1 for experts outside them (the MoE skips those pairs; weights are unchanged). batch_invariant: the sigmoid
    by ops.invariant.pointwise (the reference math only: the mode runs on CPU)."""
    if logits.is_cuda and _kernels().route_applies(logits, bias, n_group, k):
        return _kernels().route(logits, bias, n_group, topk_group, k, normalize, scale, shared, local)
    return route_reference(logits, bias, n_group, topk_group, k, normalize, scale, shared, local, batch_invariant)


def silu_mul(gate: Tensor, up: Tensor, batch_invariant: bool = False) -> Tensor:
    """F.silu(gate) * up, each op rounding to gate's dtype as torch's do; one launch on CUDA instead of two.
    batch_invariant: the silu by ops.invariant.pointwise."""
    if batch_invariant:
        return invariant.pointwise(F.silu, gate) * up
    if gate.is_cuda and _kernels().silu_mul_applies(gate, up):
        return _kernels().silu_mul(gate, up)
    return F.silu(gate) * up


def embed(ids: Tensor, weight: Tensor, start: int) -> Tensor:
    """Embedding rows of a vocabulary shard [shard, hidden] starting at token `start`: ids [T] outside the
    shard give zero rows (the attention-TP group sums the shards). One launch on CUDA instead of seven."""
    if ids.is_cuda and weight.stride(-1) == 1 and ids.dim() == 1:
        return _kernels().embed(ids, weight, start)
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    return F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * inside[:, None]


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1) of [B, V] rows (greedy sampling); on CUDA for fp32 rows, two small launches that split each
    row (torch's reduction runs one block per row)."""
    if x.is_cuda and x.dim() == 2 and x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[1] > 0:
        return _kernels().argmax(x)
    return x.argmax(-1)


def hadamard_reference(x: Tensor) -> Tensor:
    """x H over the last dim, H the normalized Hadamard matrix of Sylvester's construction (n a power of two):
    log2(n) fp32 butterfly stages (stage h maps the pair i, i + h to their sum and difference), the scale
    n^-0.5, one rounding to x's dtype. Each row takes the same adds in the same order whatever the batch (a
    GEMM's reduction order may change with its row count, and an FP8 rounding after it amplifies a last bit)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y * n ** -0.5).to(x.dtype).view(x.shape)
