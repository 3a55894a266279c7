"""Model FLOPs of one prompt's prefill, counting matrix products only (2 FLOPs per multiply-add), as the
engine computes them: the yardstick for prefill against the measured bf16 matmul rate (issue 13).

* Weight products, from the built model's modules (so both architectures, FP8 and tensor-parallel shards
  come out right): every `Linear` once per row by its logical [out, in] shape (FP8 weights included; fused
  projections are one Linear), the router's [E, H] product, and `num_experts_per_tok` routed experts (with
  --ep this rank's expected share of them, k x local / all experts) and a stacked shared expert (3 x
  intermediate x hidden each, padding of FP8 expert blocks left out: it multiplies zeros).
  The absorbed MLA's W_UK / W_UV products per head together have exactly kv_b_proj's shape, so it
  counts as a Linear.
  The indexer's query side (wq_b, weights_proj) runs for every row of a step whose key width is past
  index_topk (Indexer.forward); its wk always runs (fused with q_a and kv_a).
* Sparse attention, closed form over positions: row p attends min(p + 1, index_topk) latent rows, per
  head scoring over kv_lora_rank + qk_rope_head_dim and summing values over kv_lora_rank.
* Indexer scores, only in layers with their own indexer ("full"; "shared" layers reuse the previous
  top-k) and only past index_topk keys: row p scores all p + 1 causal keys, index_n_heads x index_head_dim.
* lm_head for each pass's one logit row (the prompt's last).
* With MTP speculation (spec_steps > 0) the prefill step also runs the MTP layer over the prompt's rows
  and spec_steps - 1 chained draft rows at positions prompt_len .. prompt_len + spec_steps - 2 (drafter.py).

The prompt is taken as one chunk from position 0 (no cached prefix), as `bench one-batch` runs it; a
first chunk of a chunked prefill that ends within index_topk keys runs no indexer, which this counts (a
small over-count), and one-batch's prefill time also holds the decode rows of mixed steps. Under tensor
parallelism this is what one rank computes: its heads and weight shards, and all of the weights every
rank holds (q_a, kv_a, the indexer, the router); a prompt's indexer rows are split over the attention group
(rank 0's share counted: every attn_tp-th row from the first). Under DP attention a rank's MLP also runs the other
groups' rows: B prompts over D groups cost a rank B/D prompts of the attention side and B of the MLP side,
so B x this is an upper bound.
"""
from __future__ import annotations

from collections import Counter

from dsaserve.model.dsa import DSAModel, MLAttention, Router
from dsaserve.model.indexer import INDEXER_SPLIT_ROWS
from dsaserve.model.quant import Experts, Linear

QUERY_SIDE = (".indexer.wq_b", ".indexer.weights_proj")  # indexer products that run only past index_topk keys


def _row_macs(model: DSAModel) -> Counter[tuple[bool, bool]]:
    """Multiply-adds per row of every weight product but lm_head, keyed (in the MTP layer, indexer query side)."""
    k = model.cfg.num_experts_per_tok
    macs: Counter[tuple[bool, bool]] = Counter()
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name != "lm_head":
            n = m.in_features * m.out_features
        elif isinstance(m, Router):
            n = m.weight.shape[0] * m.weight.shape[1]
        elif isinstance(m, Experts):
            shared = m.slots - m.num_experts  # a stacked shared expert runs for every row too
            routed = k * m.num_experts / model.cfg.n_routed_experts  # with --ep: this rank's expected share
            n = (routed + shared) * 3 * m.inter * m.hidden  # gate, up, down of each selected expert, logical width
        else:
            continue
        macs[name.startswith("mtp."), name.endswith(QUERY_SIDE)] += n
    return macs


def _key_macs(model: DSAModel) -> tuple[Counter[bool], Counter[bool]]:
    """Multiply-adds per (row, key) of attention and of indexer scores, keyed by in the MTP layer."""
    cfg = model.cfg
    attn: Counter[bool] = Counter()
    index: Counter[bool] = Counter()
    for name, m in model.named_modules():
        if isinstance(m, MLAttention):
            attn[name.startswith("mtp.")] += m.num_heads * (cfg.latent_dim + cfg.kv_lora_rank)
            if m.indexer is not None:
                index[name.startswith("mtp.")] += cfg.index_n_heads * cfg.index_head_dim
    return attn, index


def _selected(rows: int, topk: int) -> int:
    """Keys the first `rows` positions attend in total: sum over p < rows of min(p + 1, topk)."""
    full = min(rows, topk)
    return full * (full + 1) // 2 + (rows - full) * topk


def prefill_flop_parts(model: DSAModel, prompt_len: int, spec_steps: int = 0) -> dict[str, float]:
    """{"linear", "attention", "indexer", "lm_head"}: FLOPs of one prompt's prefill on this rank (module doc)."""
    topk = model.cfg.index_topk
    rows, (attn, index) = _row_macs(model), _key_macs(model)
    head = model.lm_head.in_features * model.lm_head.out_features
    # (MTP layer, first position, end position): the target pass, the MTP pass, the chained draft rows
    passes = [(False, 0, prompt_len)]
    if spec_steps:
        passes += [(True, 0, prompt_len)] + [(True, prompt_len + j - 1, prompt_len + j) for j in range(1, spec_steps)]
    macs = dict.fromkeys(("linear", "attention", "indexer", "lm_head"), 0)
    tp = model.par.cfg.attn_tp
    for mtp, first, end in passes:
        scores = end > topk  # the layout's key width is `end`: past index_topk the indexer scores keys
        # The indexer's rows: every row, or under attention TP in a prompt's step of enough rows rank 0's
        # share, every tp-th row from the first (indexer.prefill_row_share; chained draft rows are single-row steps).
        step = tp if tp > 1 and end - first >= INDEXER_SPLIT_ROWS * tp else 1
        scored = range(first, end, step)
        macs["linear"] += (end - first) * rows[mtp, False] + scores * len(scored) * rows[mtp, True]
        macs["attention"] += attn[mtp] * (_selected(end, topk) - _selected(first, topk))
        macs["indexer"] += scores * index[mtp] * (len(scored) * (scored[0] + scored[-1] + 2) // 2 if scored else 0)
        macs["lm_head"] += head
    return {part: 2.0 * n for part, n in macs.items()}


def prefill_flops(model: DSAModel, prompt_len: int, spec_steps: int = 0) -> float:
    """Matmul FLOPs one rank computes to prefill one prompt of `prompt_len` tokens (module doc); `model`
    is the engine's DSAModel (engine.runner.model), `spec_steps` the engine's (MTP passes run with it)."""
    return sum(prefill_flop_parts(model, prompt_len, spec_steps).values())
