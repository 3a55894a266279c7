"""Measurements on held-out text with the training module: dense vs sparse perplexity, what the indexer
selects, and MTP accuracy.

Sparse attention is measured with the trained indexer and with two stand-in selectors of the same
top-k size (the most recent keys; random keys), and the indexer's selection is scored by the share
of the dense attention it keeps. The MTP numbers bound speculative decoding with one draft step: a
draft is accepted when the MTP layer's argmax equals the token the main model then picks, so the
accept length at one step is 1 + that rate.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsaserve.train_tiny.corpus import windows
from dsaserve.train_tiny.model import TinyDSA

Tensor = torch.Tensor
SELECTORS = ("indexer", "recent", "random")


@dataclass(frozen=True)
class Perplexity:
    context: int
    windows: int
    all_positions: dict[str, float]  # "dense", and sparse with each selector
    beyond_topk: dict[str, float]  # positions >= index_topk only (where selection drops keys)


class _StandIn(nn.Module):
    """Scores in place of an indexer: later keys higher ("recent"), or fixed-seed noise ("random")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.gen = kind, torch.Generator().manual_seed(0)

    def forward(self, x: Tensor, q_lat: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S = x.shape[:2]
        if self.kind == "recent":
            return torch.arange(S, dtype=torch.float32).expand(B, S, S)
        return torch.rand(B, S, S, generator=self.gen)


@contextmanager
def selector(model: TinyDSA, kind: str) -> Iterator[None]:
    """Sparse mode selects keys with `kind` ("indexer": the trained one) inside the block."""
    if kind not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {kind!r}")
    attns = [layer.self_attn for layer in model.layers]
    saved = [a.indexer for a in attns]
    if kind != "indexer":
        for a in attns:
            a.indexer = _StandIn(kind)
    try:
        yield
    finally:
        for a, indexer in zip(attns, saved):
            a.indexer = indexer


@torch.no_grad()
def _nll(model: TinyDSA, data: Tensor, mode: str, chunk: int = 4) -> Tensor:
    out = []
    for i in range(0, data.shape[0], chunk):
        batch = data[i:i + chunk]
        logits = model(batch[:, :-1], mode).logits
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        out.append(nll.view(batch.shape[0], -1))
    return torch.cat(out)


def perplexity(model: TinyDSA, span: Tensor, context: int) -> Perplexity:
    data = windows(span, context + 1)
    if data.shape[0] == 0:
        raise ValueError(f"held-out span of {span.numel()} tokens has no {context + 1}-token window")
    nll = {"dense": _nll(model, data, "dense")}
    for kind in SELECTORS:
        with selector(model, kind):
            nll[kind] = _nll(model, data, "sparse")
    k = model.cfg.index_topk
    return Perplexity(context, data.shape[0], {m: math.exp(v.mean()) for m, v in nll.items()},
                      {m: math.exp(v[:, k:].mean()) for m, v in nll.items()})


@torch.no_grad()
def attention_recall(model: TinyDSA, data: Tensor) -> list[dict[str, float]]:
    """Per layer (MTP last), over rows with more than index_topk keys: the share of the dense attention
    (summed over heads) on the indexer's top-k, on the most recent k keys, and on the best possible k."""
    k = model.cfg.index_topk
    attns = [layer.self_attn for layer in model.layers]
    for a in attns:
        a.record = []
    try:
        model(data, "warmup")  # dense attention; indexer scores computed beside it
        records = [a.record[0] for a in attns]  # type: ignore[index]
    finally:
        for a in attns:
            a.record = None
    out = []
    for scores, probs in records:  # the MTP layer sees one row fewer
        pos = torch.arange(scores.shape[-1])
        recent = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - k)
        att = probs.sum(1)
        att = (att / att.sum(-1, keepdim=True))[:, k:]
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(k, -1).indices, True)[:, k:]
        out.append({"indexer": (att * chosen).sum(-1).mean().item(), "recent": (att * recent[k:]).sum(-1).mean().item(),
                    "best": att.topk(k, -1).values.sum(-1).mean().item()})
    return out


def rate(hits: Tensor) -> float | None:
    """The share of True in `hits`; None where it is empty. The mean of nothing is NaN, which json.dumps writes as
    `NaN`, not JSON (strict parsers refuse the report): None is written `null`."""
    return hits.float().mean().item() if hits.numel() else None


@torch.no_grad()
def mtp_accuracy(model: TinyDSA, data: Tensor) -> dict[str, float | None]:
    """Teacher-forced on held-out windows [N, S + 1] (sparse mode, as served):
    * top1: the MTP argmax at i equals the true token i+2;
    * accept: where the main model's argmax at i is the true token i+1 (so the text is what greedy
      decoding would have fed), the MTP argmax at i equals the main model's argmax at i+1. None where there is
      no such position (a barely trained model on one window): a rate over no cases (`rate`)."""
    outs = [model(data[i:i + 4, :-1], "sparse") for i in range(0, data.shape[0], 4)]
    main = torch.cat([o.logits.argmax(-1) for o in outs])  # [N, S]
    draft = torch.cat([o.mtp_logits.argmax(-1) for o in outs])  # [N, S - 1]
    fed = main[:, :-1] == data[:, 1:-1]
    return {"mtp_top1": rate(draft == data[:, 2:]), "mtp_accept_teacher_forced": rate((draft == main[:, 1:])[fed])}


@torch.no_grad()
def greedy(model: TinyDSA, prompts: Tensor, new_tokens: int) -> Tensor:
    """Greedy continuation of equal-length prompts [B, P] (full recompute per token: fine at this size)."""
    seq = prompts
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq, "sparse").logits[:, -1:].argmax(-1)], 1)
    return seq


@torch.no_grad()
def mtp_accept_on_greedy(model: TinyDSA, prompts: Tensor, new_tokens: int) -> float | None:
    """The one-step accept rate on the model's own greedy output: MTP(h_i, t_{i+1}) == t_{i+2} (None: no cases)."""
    seq = greedy(model, prompts, new_tokens)
    draft = model(seq, "sparse").mtp_logits.argmax(-1)  # [B, S - 1], row i drafts token i + 2
    P = prompts.shape[1]
    return rate(draft[:, P - 1:-1] == seq[:, P + 1:])


def samples(model: TinyDSA, tokenizer: Any, prompts: tuple[str, ...], new_tokens: int = 40) -> dict[str, str]:
    """Greedy continuations of text prompts, cut at the first EOS."""
    out = {}
    eos = model.cfg.eos_token_ids[0]
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        new = greedy(model, torch.tensor([ids]), new_tokens)[0, len(ids):].tolist()
        out[prompt] = tokenizer.decode(new[:new.index(eos)] if eos in new else new)
    return out


def report(model: TinyDSA, held_out: Tensor, contexts: tuple[int, ...], max_windows: int) -> dict[str, Any]:
    """Every context is measured on the same held-out tokens (max_windows windows of the longest). A rate with no
    cases to count (`rate`) is None, written `null` in training_report.json, where NaN would not be JSON."""
    span = held_out[:max_windows * (max(contexts) + 1)]
    longest = windows(span, max(contexts) + 1)
    return {"perplexity": [asdict(perplexity(model, span, c)) for c in contexts],
            "attention_recall": attention_recall(model, longest[:4, :-1]),
            **mtp_accuracy(model, longest),
            "mtp_accept_greedy": mtp_accept_on_greedy(model, windows(held_out, 48)[:8], 48)}
