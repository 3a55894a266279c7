"""A differentiable DeepSeek-V3.2 module for training the embedded tiny model on full [B, S] batches.

dsaserve's DSAModel is inference-only over paged caches; this module computes the same math with
dense masked attention so it can be trained, in one of three attention modes:

* ``dense``: causal attention over every key; the indexer is idle.
* ``warmup``: dense attention; the indexer learns the attention distribution (summed over heads,
  renormalised) by KL divergence, its inputs detached so the main model gets no gradient from it.
* ``sparse``: each query attends only to the indexer's top ``index_topk`` keys; the indexer keeps
  learning by KL over the keys it selected (DeepSeek-V3.2's sparse training stage).

Parameter names follow the official checkpoint (export.py maps the few that differ). Shared pieces
with no state (RMSNorm, rope, the router) come from dsaserve.model; attention, the indexer, the
experts and the MTP block are written here, and transformers cross-checks the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsaserve.config import ModelConfig
from dsaserve.model.dsa import DenseMLP, RMSNorm, Router, linear
from dsaserve.model.rope import Rotary

Tensor = torch.Tensor
MODES = ("dense", "warmup", "sparse")


class Indexer(nn.Module):
    """score[b, s, t] = sum_h w_h(x_s) * relu(q_h(s) . k(t)) / sqrt(n_heads * head_dim), rope half-split."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wq_b = linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.wk = linear(cfg.hidden_size, cfg.index_head_dim)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=1e-6)
        self.weights_proj = linear(cfg.hidden_size, cfg.index_n_heads)

    def forward(self, x: Tensor, q_lat: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cfg, (B, S, _) = self.cfg, x.shape
        r = cfg.qk_rope_head_dim
        q = self.wq_b(q_lat).view(B, S, cfg.index_n_heads, cfg.index_head_dim)
        k = self.k_norm(self.wk(x))
        q = torch.cat([Rotary.apply(q[..., :r], cos[:, None], sin[:, None], False), q[..., r:]], -1)
        k = torch.cat([Rotary.apply(k[..., :r], cos, sin, False), k[..., r:]], -1)
        w = self.weights_proj(x) * (cfg.index_n_heads * cfg.index_head_dim) ** -0.5
        return torch.einsum("bsh,bsht->bst", w, torch.einsum("bshd,btd->bsht", q, k).relu())


class Attention(nn.Module):
    """MLA in its expanded (training) form: latent -> per-head keys and values through kv_b_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, H = cfg, cfg.num_attention_heads
        self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = linear(H * cfg.v_head_dim, cfg.hidden_size)
        self.indexer: nn.Module = Indexer(cfg)
        self.record: list[tuple[Tensor, Tensor]] | None = None  # (indexer scores, attention) when measuring

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """(output [B, S, hidden], indexer KL: a scalar, 0 in dense mode)."""
        cfg, (B, S, _), H = self.cfg, x.shape, self.cfg.num_attention_heads
        q_lat = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.q_b_proj(q_lat).view(B, S, H, cfg.qk_head_dim).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        k_nope, v = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, S, H, -1).split(
            [cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
        q_pe = Rotary.apply(q_pe, cos[:, None], sin[:, None], True)
        k_pe = Rotary.apply(k_pe, cos, sin, True)
        logits = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope)
                  + torch.einsum("bshd,btd->bhst", q_pe, k_pe)) * cfg.softmax_scale
        allowed = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None]  # [1, S, S]
        scores = None
        if mode != "dense":
            scores = self.indexer(x.detach(), q_lat.detach(), cos, sin).masked_fill(~allowed, float("-inf"))
            if mode == "sparse":
                top = scores.topk(min(cfg.index_topk, S), dim=-1).indices
                allowed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True) & allowed
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        out = self.o_proj(torch.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, H * cfg.v_head_dim))
        if self.record is not None and scores is not None:
            self.record.append((scores.detach(), probs.detach()))
        kl = x.new_zeros(()) if scores is None else indexer_kl(scores, probs.detach(), allowed)
        return out, kl


def indexer_kl(scores: Tensor, probs: Tensor, allowed: Tensor) -> Tensor:
    """KL(attention summed over heads || softmax of the indexer scores), over the allowed keys."""
    target = probs.sum(1)
    target = target / target.sum(-1, keepdim=True)
    log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    terms = target * (target.clamp_min(1e-12).log() - log_q)
    return terms.where(allowed & (target > 0), torch.zeros_like(terms)).sum(-1).mean()


class MoE(nn.Module):
    """Sigmoid group-limited routing (dsaserve's Router); each expert runs on the rows routed to it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, Hd = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate = Router(cfg)
        self.gate.e_score_correction_bias.requires_grad_(False)  # moved by load balancing, not by gradients
        self.gate_proj = nn.Parameter(torch.empty(E, I, Hd))
        self.up_proj = nn.Parameter(torch.empty(E, I, Hd))
        self.down_proj = nn.Parameter(torch.empty(E, Hd, I))
        self.shared_experts = DenseMLP(Hd, I * cfg.n_shared_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, tokens routed to each expert [E])."""
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.gate(flat)
        expert, weight = ids.flatten(), weights.flatten()
        token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(ids.shape[1])
        load = torch.bincount(expert, minlength=self.gate_proj.shape[0])
        out = self.shared_experts(flat)
        for e, pairs in enumerate(expert.argsort(stable=True).split(load.tolist())):
            if pairs.numel():
                rows = flat[token[pairs]]
                h = F.silu(rows @ self.gate_proj[e].T) * (rows @ self.up_proj[e].T)
                out = out.index_add(0, token[pairs], (h @ self.down_proj[e].T) * weight[pairs, None])
        return out.view_as(x), load


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp: nn.Module = DenseMLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor | None]:
        attn, kl = self.self_attn(self.input_layernorm(h), cos, sin, mode)
        h = h + attn
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            out, load = self.mlp(x)
            return h + out, kl, load
        return h + self.mlp(x), kl, None


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # the head itself is lm_head (shared)


class MTPLayer(Layer):
    """Predicts token i+2 from the main model's final-normed hidden state h_i and the embedding of t_{i+1}."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, dense=False)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)


@dataclass(frozen=True)
class Outputs:
    logits: Tensor  # [B, S, V]: token i+1
    mtp_logits: Tensor  # [B, S - 1, V]: token i+2 (from h_i and t_{i+1})
    kl: Tensor  # indexer KL summed over layers (0 in dense mode)
    loads: list[Tensor]  # tokens per routed expert, per MoE layer (MTP last)


class TinyDSA(nn.Module):
    """Embedding and lm_head are shared by the main model and the MTP layer, as in DeepSeek-V3."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, t == "dense") for t in cfg.mlp_layer_types] + [MTPLayer(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, torch.device("cpu"))

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        depth_scale = (2 * (len(self.layers))) ** -0.5  # residual-branch outputs start small
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.zeros_(p) if name.endswith(("bias", "e_score_correction_bias")) else nn.init.ones_(p)
                continue
            std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 1.0)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: Tensor, mode: str) -> Outputs:
        """tokens [B, S]: logits for positions 0..S-1 and MTP logits for 0..S-2."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        S = tokens.shape[1]
        cos, sin = self.rotary.cos_sin(torch.arange(S), torch.float32)
        emb = self.embed_tokens(tokens)
        h, kl, loads = emb, emb.new_zeros(()), []
        for layer in self.layers[:-1]:
            h, layer_kl, load = layer(h, cos, sin, mode)
            kl, loads = kl + layer_kl, loads + ([load] if load is not None else [])
        h = self.norm(h)
        mtp: MTPLayer = self.layers[-1]  # type: ignore[assignment]
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb[:, 1:]), mtp.hnorm(h[:, :-1])], -1))
        m, mtp_kl, load = mtp(x, cos[:S - 1], sin[:S - 1], mode)
        mtp_logits = self.lm_head(mtp.shared_head.norm(m))
        return Outputs(self.lm_head(h), mtp_logits, kl + mtp_kl, loads + [load])
