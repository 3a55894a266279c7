"""The lightning indexer of DeepSeek Sparse Attention: scores every visible key per query row and keeps the top
index_topk cache slots for the layer's sparse MLA (layers of a shared-indexer model reuse the previous layer's)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsaserve.cache.pools import IndexKeyPrologue
from dsaserve.config import ModelConfig
from dsaserve.engine.layout import StepMode
from dsaserve.model.quant import Linear
from dsaserve.ops.fp8 import QuantizedRows
from dsaserve.ops.fused import linear_fp32, rope_index_

if TYPE_CHECKING:
    from dsaserve.model.dsa import StepContext

Tensor = torch.Tensor
INDEXER_SPLIT_ROWS = 16  # rows per attention-TP rank from which a prefill step's indexer rows are split


class Indexer(nn.Module):
    """Lightning indexer: scores every visible key per query row and keeps the top index_topk slots."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.wk = Linear(cfg.hidden_size, cfg.index_head_dim)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads)  # kept in fp32
        self.weight_scale = cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5

    def forward(self, x: Tensor, q_lat: Tensor, k_proj: Tensor, ctx: StepContext, prev_topk: Tensor | None,
                q_lat_fp8: QuantizedRows | None = None, attended: slice | None = None) -> Tensor:
        """The selection of the rows `attended` (every row where None; else this rank's prefill_row_share, which
        its attention alone reads: MLAttention._row_share). k_proj: wk(x), made by the attention's input
        projection (fused with q_a and kv_a); q_lat_fp8: q_lat's rows quantized by its norm, for wq_b;
        prev_topk: the previous layer's selection of the same rows."""
        cfg, T = self.cfg, x.shape[0]
        norm = self.k_norm  # applied by the write with the rotary (one launch on CUDA; k_proj its scratch)
        ctx.pools.write_index_keys(self.layer_id, ctx.layout.out_slots, k_proj, IndexKeyPrologue(
            norm.weight, norm.bias, norm.eps, ctx.cos, ctx.sin, cfg.qk_rope_head_dim, cfg.indexer_rope_interleave))
        if ctx.layout.key_width <= cfg.index_topk:  # every row selects all its keys: no scores needed, and
            # the previous layer's selection (same layout) is this one's
            return prev_topk if prev_topk is not None else ctx.ops.all_slots(ctx.layout, cfg.index_topk, attended)
        own = prefill_row_share(ctx, T)
        assert attended is None or attended == own, "the attention attends the rows the indexer scores"

        def mine(t: Tensor) -> Tensor:  # this rank's rows of a per-row tensor
            return t if own is None else t[own].contiguous()

        q = self.wq_b(mine(q_lat), q_lat_fp8 if own is None else None).view(-1, cfg.index_n_heads, cfg.index_head_dim)
        q = rope_index_(q, cfg.qk_rope_head_dim, mine(ctx.cos), mine(ctx.sin), cfg.indexer_rope_interleave,
                        ctx.pools.rotates_index_keys)  # (over an FP8 cache also its keys' Hadamard basis)
        cache = ctx.pools.index_keys(self.layer_id)
        weights = linear_fp32(mine(x), self.weights_proj.weight, self.weight_scale,  # kept in fp32
                              batch_invariant=ctx.ops.batch_invariant)
        topk = ctx.ops.indexer_topk(q, weights, cache, ctx.layout, cfg.index_topk, own)
        if attended is not None:  # each rank's own rows, which its attention alone reads: nothing to gather
            return topk
        if own is not None:
            topk = ctx.par.all_gather_attn_rows(topk, T)
        if ctx.ops.checks and own is None:  # the indexer is replicated: every rank of the group must select the same
            ctx.par.check_same_in_attn_group(f"layer {self.layer_id} top-k", topk)
        return topk


def prefill_row_share(ctx: StepContext, T: int) -> slice | None:
    """The rows this rank scores when the attention group splits a prefill's rows (each rank selects for its
    share, every attn_tp-th row, then the group gathers the slot ids: under TP the 64 index heads are not
    sharded, and at long prompts they are about half a rank's prefill FLOPs; MLAttention._attend splits its rows
    the same way); None: every rank scores every row (decode and verify steps, whose few rows a gather would only
    delay, and steps of fewer than INDEXER_SPLIT_ROWS rows per rank)."""
    tp = ctx.par.cfg.attn_tp
    if tp == 1 or ctx.layout.mode not in (StepMode.EXTEND, StepMode.MIXED) or T < INDEXER_SPLIT_ROWS * tp:
        return None
    return ctx.par.attn_row_share(T)
