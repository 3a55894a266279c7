"""DeepSeek-V3.2's DSA recipe in miniature: dense pre-training, indexer warm-up, sparse training.

* dense: the main model and the MTP layer learn next-token / next-next-token prediction.
* warmup: everything but the indexers is frozen; each indexer learns to match its layer's dense
  attention distribution (KL).
* sparse: attention runs over the indexer's top-k; the main model and MTP keep learning the LM
  losses while the indexers learn by KL over the keys they selected (their inputs are detached,
  so the two objectives do not mix).

Routing is balanced without an auxiliary loss, as DeepSeek-V3 does: after every step the
`e_score_correction_bias` of an over-loaded expert goes down by `bias_rate`, an under-loaded one up.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dsaserve.train_tiny.model import MoE, TinyDSA

Tensor = torch.Tensor


@dataclass(frozen=True)
class Stage:
    mode: str  # "dense" | "warmup" | "sparse" (the attention mode it trains in)
    steps: int
    batch: int
    seq_len: int


@dataclass(frozen=True)
class Optim:
    lr: float = 3e-3
    indexer_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    mtp_weight: float = 0.3  # DeepSeek-V3's lambda for the MTP loss
    bias_rate: float = 1e-3  # load-balancing step of e_score_correction_bias


@dataclass
class History:
    """Losses as training goes (a list of dicts, one per logged step)."""
    rows: list[dict[str, Any]] = field(default_factory=list)


def batches(stream: Tensor, stage: Stage, gen: torch.Generator) -> Callable[[], Tensor]:
    """Random windows of seq_len + 1 tokens from the training stream."""
    span = stage.seq_len + 1
    if stream.numel() <= span:
        raise ValueError(f"training stream of {stream.numel()} tokens is shorter than a {span}-token window")

    def draw() -> Tensor:
        starts = torch.randint(0, stream.numel() - span, (stage.batch,), generator=gen)
        return torch.stack([stream[s:s + span] for s in starts.tolist()])
    return draw


def lm_losses(model: TinyDSA, tokens: Tensor, mode: str) -> dict[str, Tensor]:
    """Next-token loss, MTP next-next-token loss and indexer KL of one batch [B, S + 1]."""
    out = model(tokens[:, :-1], mode)
    lm = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    mtp = F.cross_entropy(out.mtp_logits.flatten(0, 1), tokens[:, 2:].flatten())
    return {"lm": lm, "mtp": mtp, "kl": out.kl, "loads": out.loads}  # type: ignore[dict-item]


def _schedule(step: int, total: int, opt: Optim) -> float:
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(total - opt.warmup_steps, 1)
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(params: list[torch.nn.Parameter], lr: float, wd: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _balance(model: TinyDSA, loads: list[Tensor], rate: float) -> None:
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    with torch.no_grad():
        for moe, load in zip(moes, loads):
            moe.gate.e_score_correction_bias += rate * torch.sign(load.float().mean() - load.float())


def train(model: TinyDSA, stream: Tensor, stages: tuple[Stage, ...], opt: Optim, seed: int,
          log_every: int = 25, log: Callable[[str], None] = print) -> History:
    gen = torch.Generator().manual_seed(seed)
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    main = [p for n, p in model.named_parameters() if ".indexer." not in n and p.requires_grad]
    main_opt, idx_opt = _optimizer(main, opt.lr, opt.weight_decay), _optimizer(indexer, opt.indexer_lr, 0.0)
    main_total = sum(s.steps for s in stages if s.mode != "warmup")
    idx_total = sum(s.steps for s in stages if s.mode != "dense")
    main_step = idx_step = 0
    history, start = History(), time.monotonic()
    model.train()
    for stage in stages:
        draw = batches(stream, stage, gen)
        for p in main:
            p.requires_grad_(stage.mode != "warmup")  # warm-up trains the indexers alone
        for step in range(stage.steps):
            losses = lm_losses(model, draw(), stage.mode)
            total = losses["kl"] if stage.mode == "warmup" else (
                losses["lm"] + opt.mtp_weight * losses["mtp"] + losses["kl"])
            total.backward()
            if stage.mode != "warmup":
                _step(main_opt, main, opt.lr * _schedule(main_step, main_total, opt), opt.clip)
                _balance(model, losses["loads"], opt.bias_rate)
                main_step += 1
            if stage.mode != "dense":
                _step(idx_opt, indexer, opt.indexer_lr * _schedule(idx_step, idx_total, opt), opt.clip)
                idx_step += 1
            if step % log_every == 0 or step == stage.steps - 1:
                row = {"stage": stage.mode, "step": step, "lm": losses["lm"].item(), "mtp": losses["mtp"].item(),
                       "kl": losses["kl"].item(), "seconds": round(time.monotonic() - start, 1)}
                history.rows.append(row)
                log(f"[{row['seconds']:7.1f}s] {stage.mode:6s} step {step:4d}/{stage.steps}  lm {row['lm']:.3f}  "
                    f"mtp {row['mtp']:.3f}  indexer-kl {row['kl']:.3f}")
    for p in main:
        p.requires_grad_(True)
    model.eval()
    return history


def _step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], lr: float, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
