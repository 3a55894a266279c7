"""Pure PyTorch reference ops (CPU and GPU). The Triton kernels in ops/triton/ share these signatures.

Conventions
* Cache slot of (request, position) = page_table[req, pos // page_size] * page_size + pos % page_size.
* Index rows are grouped by request: `row_req` is non-decreasing.
* Top-k rows hold `min(kv_len, topk)` valid slot ids, then -1 (invariant 5).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsaserve.cache.kv_format import read_rows
from dsaserve.ops import fp8, invariant
from dsaserve.ops.fp8 import BlockFP8, QuantizedRows

Tensor = torch.Tensor


def position_slots(page_table_rows: Tensor, positions: Tensor, page_size: int) -> Tensor:
    """Slot ids of `positions` ([..., L]) for requests whose page-table rows are `page_table_rows` ([..., P])."""
    pages = torch.gather(page_table_rows, -1, (positions // page_size).long())
    return pages * page_size + positions % page_size


def sparse_mla(q: Tensor, kv_cache: Tensor, indices: Tensor, sm_scale: float, v_dim: int,
               lengths: Tensor | None = None, max_rows: int = 256,
               batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """Absorbed-form sparse MLA.

    q [T, H, D] (D = v_dim latent dims + rope dims), kv_cache [S, D] (or uint8 FP8 rows, see
    cache/kv_format.py: the selected rows are dequantized), indices [T, K] int32 slot ids
    (-1 = unused). Each row attends to its own selected slots; the value is the first v_dim dims.
    lengths [T] (or [T, 1]), optional: row t reads only its first lengths[t] indices (a bound for the
    kernels: the engine's rows keep their valid slots first and at most row_kv_len of them).
    Returns out [T, H, v_dim] in q's dtype and lse [T, H] fp32 (natural log; rows with no key: out 0,
    lse -inf). batch_invariant: exp and log by ops.invariant.pointwise (each row's products already take
    entries of their own).
    """
    T, H, _ = q.shape
    out = q.new_empty(T, H, v_dim)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    pointwise = invariant.pointwise if batch_invariant else _plain
    for start in range(0, T, max_rows):
        rows = slice(start, min(start + max_rows, T))
        idx = indices[rows].long()
        valid = idx >= 0
        if lengths is not None:
            valid &= torch.arange(idx.shape[1], device=idx.device) < lengths.reshape(T, 1)[rows].long()
        kv = read_rows(kv_cache, idx.clamp(min=0), v_dim, q.shape[-1] - v_dim)  # [t, K, D]
        scores = torch.einsum("thd,tkd->thk", q[rows].float(), kv) * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        top = scores.amax(dim=-1, keepdim=True)
        top = torch.where(top.isfinite(), top, torch.zeros_like(top))  # a row without keys: exp(-inf) = 0
        weights = pointwise(torch.exp, scores - top)
        total = weights.sum(dim=-1, keepdim=True)
        probs = (weights / total).nan_to_num(0.0)
        out[rows] = torch.einsum("thk,tkd->thd", probs, kv[..., :v_dim]).to(q.dtype)
        lse[rows] = (top + pointwise(torch.log, total)).squeeze(-1)
    return out, lse


def _plain(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return fn(x)


def indexer_logits(q: Tensor, weights: Tensor, k_cache: Tensor, page_table: Tensor, row_req: Tensor,
                   row_kv_len: Tensor, page_size: int, num_keys: int, rows_per_request: int = 1,
                   batch_invariant: bool = False) -> Tensor:
    """Indexer scores of every query row against the first `num_keys` positions of its request (rows_per_request:
    the Triton kernel's tiling hint, which changes no value).

    q [T, Hi, Di], weights [T, Hi] fp32 (already scaled by Hi^-0.5 and Di^-0.5), k_cache [S, Di] (or uint8 FP8),
    page_table [B, P], row_req [T], row_kv_len [T, 1]. Returns fp32 [T, num_keys]:
    sum_h weights[t, h] * relu(q[t, h] . k[pos]) for pos < kv_len, -inf after. batch_invariant: each dot product
    by ops.invariant.scores, alike whatever the rows and num_keys (deterministic inference).
    """
    T = q.shape[0]
    logits = torch.full((T, num_keys), float("-inf"), dtype=torch.float32, device=q.device)
    if T == 0 or num_keys == 0:
        return logits
    reqs, counts = torch.unique_consecutive(row_req, return_counts=True)
    positions = torch.arange(num_keys, device=q.device)
    start = 0
    for req, count in zip(reqs.tolist(), counts.tolist()):
        rows = slice(start, start + count)
        start += count
        keys = read_rows(k_cache, position_slots(page_table[req], positions, page_size), q.shape[-1], 0)  # [L, Di]
        qf = q[rows].float()
        scores = torch.zeros(count, num_keys, dtype=torch.float32, device=q.device)
        blocks = invariant.key_blocks(keys) if batch_invariant else keys
        for h in range(q.shape[1]):  # one head at a time keeps the intermediate output-sized
            dots = invariant.scores(qf[:, h], blocks, num_keys) if batch_invariant else qf[:, h] @ keys.T
            scores += weights[rows, h, None] * F.relu(dots)
        causal = positions[None, :] < row_kv_len[rows]
        logits[rows] = scores.masked_fill(~causal, float("-inf"))
    return logits


def topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
               topk: int, batch_invariant: bool = False) -> Tensor:
    """Slot ids of the `topk` best positions per row: min(kv_len, topk) valid, then -1. [T, topk] int32.
    batch_invariant: of equal scores the earlier positions, and the selection in position order, as
    first_positions_slots gives it (the attention sums its keys in that order; deterministic inference)."""
    T, L = logits.shape
    k = min(topk, L)
    if k == 0:
        positions = logits.new_zeros(T, 0, dtype=torch.long)
    elif batch_invariant:  # (a row's -inf positions, past its keys, sort after the valid ones)
        positions = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    else:
        positions = logits.topk(k, dim=-1).indices
    return _positions_to_slots(positions, row_kv_len, page_table, row_req, page_size, topk)


def first_positions_slots(row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
                          topk: int) -> Tensor:
    """Fast path when every row sees <= topk keys: select them all, no logits needed."""
    positions = torch.arange(topk, device=row_kv_len.device).expand(row_kv_len.shape[0], topk)
    return _positions_to_slots(positions, row_kv_len, page_table, row_req, page_size, topk)


def _positions_to_slots(positions: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor,
                        page_size: int, topk: int) -> Tensor:
    T, k = positions.shape
    out = torch.full((T, topk), -1, dtype=torch.int32, device=positions.device)
    if T == 0 or k == 0:
        return out
    valid = torch.arange(k, device=positions.device)[None, :] < row_kv_len.clamp(max=topk)
    safe = torch.where(valid, positions, torch.zeros_like(positions))
    slots = position_slots(page_table[row_req.long()], safe, page_size)
    out[:, :k] = torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)
    return out


def moe_experts(x: Tensor, w13: Tensor | BlockFP8, w2: Tensor | BlockFP8, topk_ids: Tensor, topk_weights: Tensor,
                num_tokens: int, xq: QuantizedRows | None = None, local_share: float = 1.0,
                batch_invariant: bool = False) -> Tensor:
    """Routed experts: sum_k weight_k * down_e(silu(gate_e x) * up_e x) for the first num_tokens rows.

    x [N, hidden], w13 [E, 2I, hidden] (gate rows then up rows), w2 [E, hidden, I], topk_ids [N, k],
    topk_weights [N, k] fp32. Rows >= num_tokens (padding for DP sync) are skipped and come out 0, and so are
    pairs whose id is -1 (expert parallelism: another rank's expert, ops.fused.route's `local`).
    Block-FP8 experts run the FP8 kernel's function (fp8.linear: activations quantized per group; x's rows
    quantized by their producer, xq, are act_quant's values and so ignored here, as is the kernels' tiling hint
    local_share).
    Each pair's output is rounded to x's dtype and the k pairs of a token are summed in fp32 (in expert order).
    batch_invariant: each pair's products by ops.invariant, alike whatever the expert's other tokens (deterministic).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = topk_ids[:num_tokens]
    if num_tokens == 0:
        return out.to(x.dtype)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # pairs of id -1 sort first: skipped
    counts = torch.bincount(flat[flat >= 0], minlength=w13.shape[0]).tolist()
    order = order[int((flat < 0).sum()):]
    token_of = order // ids.shape[1]
    weight_of = topk_weights[:num_tokens].flatten()[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of[start:start + count]
        gate, up = _matmul_t(x[tokens], w13[expert], batch_invariant).chunk(2, dim=-1)
        act = invariant.pointwise(F.silu, gate) if batch_invariant else F.silu(gate)
        y = _matmul_t(act * up, w2[expert], batch_invariant)
        out.index_add_(0, tokens, (y * weight_of[start:start + count, None]).to(x.dtype).float())
        start += count
    return out.to(x.dtype)


def _matmul_t(a: Tensor, w: Tensor | BlockFP8, batch_invariant: bool = False) -> Tensor:
    if isinstance(w, BlockFP8):
        return fp8.linear(a, w, batch_invariant)
    return invariant.linear(a, w) if batch_invariant else a @ w.T
