"""The DSA decoder (DeepSeek-V3.2 / GLM-5): MLA in absorbed form, the lightning indexer, MoE, MTP.

Module and parameter names follow the official checkpoints (minus the `model.` prefix), so the
loader maps tensor names one to one; routed experts are stacked into [E, ...] tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsaserve.cache.pools import KVPools, LatentPrologue
from dsaserve.config import ModelConfig
from dsaserve.engine.layout import BatchLayout
from dsaserve.model.indexer import Indexer, prefill_row_share
from dsaserve.model.quant import Experts, Linear, concat_rows
from dsaserve.model.rope import Rotary
from dsaserve.ops.dispatch import DSAOps
from dsaserve.ops.fp8 import QuantizedRows
from dsaserve.ops.fused import absorb_output, absorb_query, add_rms_norm, embed, linear_fp32, rms_norm, route, silu_mul
from dsaserve.parallel.groups import Parallel, ParallelConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class StepContext:
    """Everything a layer reads during one step besides its input rows."""
    layout: BatchLayout
    pools: KVPools
    ops: DSAOps
    par: Parallel
    cos: Tensor  # [T, rope_dim / 2]
    sin: Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: Tensor, delta: Tensor | None,
                    quant_group: int = 0) -> tuple[Tensor, Tensor, QuantizedRows | None]:
        """(norm(x + delta), x + delta, fp8): the residual add fused into the norm (delta None: x alone); fp8: the
        normed rows quantized for the FP8 GEMM that reads them when quant_group > 0 and the kernel can (else
        None; ops.fused.add_rms_norm)."""
        return add_rms_norm(x, delta, self.weight, self.eps, quant_group)


def linear(in_features: int, out_features: int) -> Linear:
    return Linear(in_features, out_features)  # compute dtype; the loader switches it to FP8 per checkpoint


ROW_SPLIT_HEADS = 64  # heads per rank from which a prefill's attention keeps the head split (a wgmma tile's rows)
SIDE_STREAM_ROWS = 256  # steps of at most this many rows run the indexer on DSAOps.side_stream


class MLAttention(nn.Module):
    """Multi-head latent attention over the paged latent cache, absorbed form for every row kind."""

    def __init__(self, cfg: ModelConfig, layer_id: int, attn_tp: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.num_heads = cfg.num_attention_heads // attn_tp  # this rank's heads
        self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = linear(cfg.q_lora_rank, self.num_heads * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = linear(cfg.kv_lora_rank, self.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = linear(self.num_heads * cfg.v_head_dim, cfg.hidden_size)
        own_indexer = layer_id >= cfg.num_hidden_layers or cfg.indexer_types[layer_id] == "full"  # MTP: own
        self.indexer = Indexer(cfg, layer_id) if own_indexer else None
        self.input_proj: Linear | None = None  # q_a, the indexer's wk and kv_a as one GEMM (fuse_projections)

    def fuse_input_projections(self) -> None:
        """q_a, wk and kv_a read the same rows: one GEMM (kv_a last: its 576 rows end inside a scale block)."""
        parts = [("q_a_proj", self.q_a_proj)] + ([("indexer.wk", self.indexer.wk)] if self.indexer else []) + \
            [("kv_a_proj_with_mqa", self.kv_a_proj_with_mqa)]
        self.input_proj = concat_rows(parts)
        if self.input_proj is not None:
            del self.q_a_proj, self.kv_a_proj_with_mqa
            if self.indexer is not None:
                del self.indexer.wk

    def input_group(self, rows: int) -> int:
        """The group in which the input projection takes `rows` rows quantized by the input norm, or 0."""
        return (self.input_proj or self.q_a_proj).input_group(rows)

    def _project_input(self, x: Tensor, xq: QuantizedRows | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """(q_a(x), wk(x) or None without an own indexer, kv_a(x))."""
        if self.input_proj is None:
            return (self.q_a_proj(x, xq), self.indexer.wk(x, xq) if self.indexer is not None else None,
                    self.kv_a_proj_with_mqa(x, xq))
        parts = self.input_proj(x, xq).split([rows for _, _, rows in self.input_proj.sources], dim=-1)
        return parts[0], parts[1] if self.indexer is not None else None, parts[-1]

    def forward(self, x: Tensor, ctx: StepContext, prev_topk: Tensor | None,
                xq: QuantizedRows | None = None, reuse_prev: bool = False) -> tuple[Tensor, Tensor]:
        """xq: x's rows quantized by the input norm (input_group), or None. reuse_prev: attend prev_topk without
        running this layer's own indexer (the MTP layer's later draft steps under index_share_for_mtp_iteration)."""
        cfg, T, H = self.cfg, x.shape[0], self.num_heads
        q_a, k_proj, kv_a = self._project_input(x, xq)
        q_lat, _, q_lat_fp8 = self.q_a_layernorm.add_forward(q_a, None, self.q_b_proj.input_group(T))
        own = self._row_share(ctx, T)  # the rows this rank attends, or None: every row
        indexer = None if reuse_prev else self.indexer
        side = self._side_stream(ctx, T) if indexer is not None else None
        if side is None:
            q_full = self._query(x, q_lat, q_lat_fp8, kv_a, ctx)
            topk = indexer(x, q_lat, k_proj, ctx, prev_topk, q_lat_fp8, own) if indexer is not None else prev_topk
        else:  # the indexer's chain beside the query path, joined before the attention even when one raises
            main = torch.cuda.current_stream()  # (the failed step's pages go back to the pool)
            side.wait_stream(main)
            try:
                with torch.cuda.stream(side):
                    topk = indexer(x, q_lat, k_proj, ctx, prev_topk, q_lat_fp8, own)
                q_full = self._query(x, q_lat, q_lat_fp8, kv_a, ctx)
            finally:
                main.wait_stream(side)
        assert topk is not None, "a shared-indexer layer needs the previous layer's top-k"
        o_lat = self._attend(q_full, topk, ctx, own)
        o, oq = absorb_output(o_lat.to(x.dtype), self._absorbed()[1], self.o_proj.input_group(T),  # W_UV after
                              ctx.ops.batch_invariant)
        out = self.o_proj(o.view(T, H * cfg.v_head_dim), oq)
        return ctx.par.all_reduce_attn(out, ordered=ctx.ops.batch_invariant), topk

    def _attend(self, q_full: Tensor, topk: Tensor, ctx: StepContext, own: slice | None) -> Tensor:
        """Sparse MLA of this rank's heads over every row, or, where the attention group splits a prefill's rows
        (own: _row_share; topk then holds those rows only), of every head of the group over this rank's rows: its
        queries and outputs exchanged by all-to-all. Fewer heads than a 64-row tile (a --tp 4 / 8 rank) pad the
        Hopper kernels' tiles; the whole group's heads fill them, and each rank attends 1 / attn_tp of the rows."""
        cfg, cache = self.cfg, ctx.pools.latent(self.layer_id)
        if own is None:
            return ctx.ops.sparse_mla(q_full, cache, topk, cfg.softmax_scale, cfg.kv_lora_rank, ctx.layout)
        if ctx.ops.checks:  # every rank checks every row's inputs, so that all raise alike
            every = ctx.par.all_gather_attn_rows(topk, q_full.shape[0])
            ctx.ops.check_sparse_mla(q_full, cache, every, cfg.kv_lora_rank, ctx.layout)
        q_rows = ctx.par.attn_heads_to_rows(q_full)
        o_rows = ctx.ops.sparse_mla(q_rows, cache, topk, cfg.softmax_scale, cfg.kv_lora_rank, ctx.layout, rows=own)
        return ctx.par.attn_rows_to_heads(o_rows, q_full.shape[0])

    def _row_share(self, ctx: StepContext, T: int) -> slice | None:
        """The rows this rank attends to with the group's heads: in the prefill steps whose rows the indexer
        splits when it scores them (prefill_row_share) and where this rank holds fewer than ROW_SPLIT_HEADS heads;
        not in deterministic mode, where a row's products keep one shape whatever the step (ops/invariant.py)."""
        if self.num_heads >= ROW_SPLIT_HEADS or ctx.ops.batch_invariant:
            return None
        return prefill_row_share(ctx, T)

    def _absorbed(self) -> tuple[Tensor, Tensor]:
        """(W_UK [H, nope, latent], W_UV [H, v, latent]): kv_b_proj's two parts."""
        cfg = self.cfg
        w_kv = self.kv_b_proj.weight.view(self.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w_kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        return w_uk, w_uv

    def _query(self, x: Tensor, q_lat: Tensor, q_lat_fp8: QuantizedRows | None, kv_a: Tensor,
               ctx: StepContext) -> Tensor:
        """The attention's query path: q_b, this step's latent rows into the cache, and the absorbed query
        [T, H, latent | rope] (W_UK folded into q_nope, q_pe rotated) in the cache's query dtype."""
        cfg, T, H = self.cfg, x.shape[0], self.num_heads
        q = self.q_b_proj(q_lat, q_lat_fp8).view(T, H, cfg.qk_head_dim)
        latent, k_pe = kv_a.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        norm = self.kv_a_layernorm  # applied by the write, with k_pe's rotary (one launch on CUDA)
        ctx.pools.write_latent(self.layer_id, ctx.layout.out_slots, latent, k_pe,
                               LatentPrologue(norm.weight, norm.eps, ctx.cos, ctx.sin))
        q_full = absorb_query(q, self._absorbed()[0], ctx.cos, ctx.sin,
                              x.new_empty(T, H, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ctx.ops.batch_invariant)
        return q_full.to(ctx.pools.query_dtype(x.dtype))

    def _side_stream(self, ctx: StepContext, T: int) -> torch.cuda.Stream | None:
        """The stream this layer's indexer runs on, or None (in order on the caller's). In decode-sized steps
        whose keys outnumber index_topk the indexer's chain of small kernels (its query GEMM, scores, top-k)
        is the longest part of the layer and does not read the query path's results (q_b, the latent write,
        W_UK): on two streams the two chains overlap. Not in a prefill's row split (its collectives). In checked mode
        too: a graph's eager warm-up call and its capture must take the same streams (per-stream scratch)."""
        side = ctx.ops.side_stream
        if (side is None or self.indexer is None or T > SIDE_STREAM_ROWS
                or ctx.layout.key_width <= self.cfg.index_topk or prefill_row_share(ctx, T) is not None):
            return None
        return side


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate)
        self.up_proj = linear(hidden, intermediate)
        self.down_proj = linear(intermediate, hidden)
        self.gate_up_proj: Linear | None = None  # gate and up as one GEMM (fuse_projections)

    def fuse_gate_up(self) -> None:
        self.gate_up_proj = concat_rows([("gate_proj", self.gate_proj), ("up_proj", self.up_proj)])
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def input_group(self, rows: int) -> int:
        return (self.gate_up_proj or self.gate_proj).input_group(rows)

    def forward(self, x: Tensor, xq: QuantizedRows | None = None, batch_invariant: bool = False) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x, xq), self.up_proj(x, xq)
        else:
            gate, up = self.gate_up_proj(x, xq).chunk(2, dim=-1)
        return self.down_proj(silu_mul(gate, up, batch_invariant))


def fuse_projections(model: nn.Module) -> None:
    """GEMMs that read the same rows become one (quant.concat_rows) and a shared expert joins the routed ones
    (MoE.fuse_shared_expert): fewer launches per decode step. Call on the meta model, after formats and dtypes
    are chosen; the loader fills each part's rows."""
    for module in list(model.modules()):
        if isinstance(module, MoE):
            module.fuse_shared_expert()
    for module in list(model.modules()):
        if isinstance(module, MLAttention):
            module.fuse_input_projections()
        elif isinstance(module, DenseMLP):
            module.fuse_gate_up()


class Router(nn.Module):
    """Sigmoid scores; selection adds the correction bias and is limited to the best expert groups."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))  # kept in fp32
        self.shared = False  # every row also picks expert n_routed_experts, weight 1 (MoE.fuse_shared_expert)
        self.local: tuple[int, int] | None = None  # expert parallelism: (first, count) of this rank's experts

    def forward(self, x: Tensor, batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        logits = linear_fp32(x, self.weight, batch_invariant=batch_invariant)  # in fp32 (the weight in the model dtype)
        return route(logits, self.e_score_correction_bias.float(), cfg.n_group, cfg.topk_group,
                     cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor, self.shared, self.local,
                     batch_invariant)


class MoE(nn.Module):
    """Routed experts and shared experts, each split along the intermediate dim over all TP ranks (with --ep the
    routed experts divided among the ranks instead, quant.Experts): the output is this rank's partial sum."""

    def __init__(self, cfg: ModelConfig, par: ParallelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg, par)
        self.expert_parallel = par.ep > 1
        if self.expert_parallel:
            self.gate.local = (self.experts.first_expert, self.experts.num_experts)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts // par.tp
        self.shared_experts = DenseMLP(cfg.hidden_size, shared) if shared else None

    def fuse_shared_expert(self) -> None:
        """One shared expert (DeepSeek-V3.2, GLM-5) is as wide as a routed one: stacked after them as expert
        E, which every row picks with weight 1, it runs inside the fused MoE (no dense MLP's three launches
        and add). Kept apart when there are several (wider than one expert) or the formats differ."""
        mlp = self.shared_experts
        if mlp is None or not self.experts.can_stack(mlp.gate_proj, self.expert_parallel):
            return
        self.experts.add_shared_slot()
        self.gate.shared = True
        self.shared_experts = None

    def input_group(self, rows: int) -> int:
        return self.experts.input_group(rows)

    def forward(self, x: Tensor, ops: DSAOps, xq: QuantizedRows | None = None) -> Tensor:
        ids, weights = self.gate(x, ops.batch_invariant)
        out = self.experts(x, ids, weights, ops, xq)
        return out + self.shared_experts(x, xq, ops.batch_invariant) if self.shared_experts is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, par: Parallel):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer_id, par.cfg.attn_tp)
        dense = layer_id < cfg.num_hidden_layers and cfg.mlp_layer_types[layer_id] == "dense"
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size // par.tp) if dense else MoE(cfg, par.cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, delta: Tensor | None, ctx: StepContext, prev_topk: Tensor | None,
                reuse_prev: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's input is h + delta (delta: the previous layer's MLP output, or None) -> (h, this layer's
        MLP output, top-k). Each residual add happens inside the next norm (one launch for both)."""
        T = h.shape[0]
        x, h, xq = self.input_layernorm.add_forward(h, delta, self.self_attn.input_group(T))
        attn, topk = self.self_attn(x, ctx, prev_topk, xq, reuse_prev)
        group = self.mlp.input_group(T) if ctx.par.cfg.dp == 1 else 0  # DP: gathered rows come unquantized
        x, h, xq = self.post_attention_layernorm.add_forward(h, attn, group)
        # DP attention: the MLP sees every group's rows; each group takes exactly its rows back.
        x = ctx.par.gather_dp_rows(x, ctx.layout.dp_sizes)
        mlp = self.mlp(x, xq, ctx.ops.batch_invariant) if isinstance(self.mlp, DenseMLP) else self.mlp(x, ctx.ops, xq)
        mlp = ctx.par.all_reduce_world(mlp, ordered=ctx.ops.batch_invariant)
        return h, ctx.par.own_dp_rows(mlp, ctx.layout.dp_sizes), topk


class VocabEmbedding(nn.Module):
    """Embedding rows split over the attention-TP group; ids outside this shard contribute zeros."""

    def __init__(self, vocab: int, hidden: int, par: Parallel):
        super().__init__()
        self.shard = vocab // par.cfg.attn_tp
        self.start = par.cfg.attn_rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden))

    def forward(self, ids: Tensor, par: Parallel) -> Tensor:
        return par.all_reduce_attn(embed(ids, self.weight, self.start))


class SharedHead(nn.Module):
    """The MTP layer's final norm. Its `head` is the target's lm_head (DSAModel.logits)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """NextN block (checkpoint layer index num_hidden_layers), the draft model of MTP speculative decoding:
    eh_proj([enorm(embed(next token)); hnorm(h)]) -> one DSA decoder layer (own indexer, own caches on the
    target's page ids) -> shared_head.norm -> head.

    The embedding and the head are the target's: DeepSeek-V3's MTP modules share them (the checkpoint's
    copies under the MTP layer are equal to the target's and are not loaded) and GLM-5 ships no head.
    One copy saves 2 x vocabulary x hidden per rank (3.5 GiB for DeepSeek-V3.2 under DP attention)."""

    def __init__(self, cfg: ModelConfig, par: Parallel):
        super().__init__(cfg, cfg.num_hidden_layers, par)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def draft(self, input_ids: Tensor, hidden: Tensor, ctx: StepContext, embed: VocabEmbedding,
              reused_topk: Tensor | None, keep_topk: bool) -> tuple[Tensor, Tensor | None]:
        """Row t: the next token after position t and h_t -> (the normed hidden state that predicts the
        token after that and feeds the next chained draft step, the selection of every row if keep_topk).
        reused_topk: the selection each row attends instead of running the indexer (index sharing)."""
        e = self.enorm(embed(input_ids, ctx.par))
        h = self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], dim=-1))
        h, delta, topk = self(h, None, ctx, reused_topk, reuse_prev=reused_topk is not None)
        if keep_topk and topk.shape[0] != h.shape[0]:  # a prefill's rows split over the group (_row_share)
            topk = ctx.par.all_gather_attn_rows(topk, h.shape[0])
        return self.shared_head.norm.add_forward(h, delta)[0], topk if keep_topk else None


class DSAModel(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel | None = None, load_mtp: bool = True):
        super().__init__()
        self.cfg, self.par = cfg, par or Parallel()
        cfg.check_parallel(self.par.tp, self.par.cfg.attn_tp, self.par.cfg.ep)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, self.par)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.par) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size // self.par.cfg.attn_tp)
        self.mtp = MTPLayer(cfg, self.par) if load_mtp and cfg.num_nextn_predict_layers > 0 else None
        self.rotary: Rotary | None = None

    def fp32_parameter_names(self) -> set[str]:
        """Parameters that stay in fp32 whatever the model dtype (as in the official inference code), and the
        FP8 block scales. The router's weight is not one of them: its product is taken in fp32 (linear_fp32
        converts each value exactly) from the model dtype, as transformers holds it, at half the bytes."""
        return {n for n, _ in self.named_parameters()
                if n.endswith(("weights_proj.weight", "e_score_correction_bias", "_scale_inv"))}

    def context(self, layout: BatchLayout, pools: KVPools, ops: DSAOps, dtype: torch.dtype) -> StepContext:
        if self.rotary is None:
            self.rotary = Rotary(self.cfg.rope, self.cfg.qk_rope_head_dim, layout.row_pos.device)
        cos, sin = self.rotary.cos_sin(layout.row_pos, dtype, ops.batch_invariant)
        return StepContext(layout, pools, ops, self.par, cos, sin)

    def forward(self, input_ids: Tensor, layout: BatchLayout, pools: KVPools, ops: DSAOps) -> Tensor:
        """Final-normed hidden states [T, hidden] of every query row of this DP group."""
        h = self.embed_tokens(input_ids, self.par)
        ctx = self.context(layout, pools, ops, h.dtype)
        delta = topk = None
        for layer in self.layers:
            h, delta, topk = layer(h, delta, ctx, topk)
        return self.norm.add_forward(h, delta)[0]

    def draft(self, input_ids: Tensor, hidden: Tensor, layout: BatchLayout, pools: KVPools, ops: DSAOps,
              reused_topk: Tensor | None = None, keep_topk: bool = False) -> tuple[Tensor, Tensor | None]:
        """The MTP layer over the layout's rows: ([T, hidden] normed states, [T, index_topk] selection if
        keep_topk) (see MTPLayer.draft)."""
        assert self.mtp is not None, "the model was built without its MTP layer"
        ctx = self.context(layout, pools, ops, hidden.dtype)
        return self.mtp.draft(input_ids, hidden, ctx, self.embed_tokens, reused_topk, keep_topk)

    def logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary fp32 logits (vocab shards gathered over the attention-TP group); the MTP layer's
        states take the same head."""
        return self.par.all_gather_attn(self.lm_head(hidden).float())
