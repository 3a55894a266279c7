"""Sampler: grammar masks, logit bias, min_tokens, penalties (repetition, frequency, presence), greedy /
temperature / top-k / top-p / min-p, per-request reproducible seeds.

A sampled token depends only on the request's logits, its seed and how many tokens it has produced,
never on the rest of the batch or on retraction: each sampled row is one inverse-CDF draw with a
uniform hashed from (seed, output index) on the host, all rows at once (no per-row generators or
kernels). On CUDA one Triton launch filters and draws every sampled row (no sort: a bisection for the
threshold); elsewhere the reference here sorts the rows that ask for top-k / top-p / min-p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dsaserve.chat.grammar import grammar_state
from dsaserve.engine.request import GREEDY_BELOW, Request, SamplingParams
from dsaserve.engine.thinking import GRACE_TOKENS, ThinkingProgress
from dsaserve.ops.fused import argmax

Tensor = torch.Tensor
_MASK64 = (1 << 63) - 1
MIN_TEMPERATURE = GREEDY_BELOW  # a sampled row's temperature floor (below it a row is greedy: argmax)


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for (request seed, output index) (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK64


def row_uniform(seed: int, index: int) -> float:
    """The uniform in [0, 1) (53 bits) that draws output `index` of a request with `seed`."""
    return (step_seed(seed, index) >> 10) * 2.0 ** -53


def draw(probs: Tensor, uniforms: list[float]) -> Tensor:
    """Inverse-CDF draw, one row per uniform: the first token whose cumulative probability passes
    u x (the row's total). Cumulated in fp64, so the small tail of a 129K vocabulary keeps its mass;
    a token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    u = upload(uniforms, torch.float64, probs.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last_positive = probs.shape[1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(picked, last_positive)  # u x total can round up to the total itself


def upload(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values as a device tensor without a host sync: a blocking copy waits for the stream, i.e. for the
    forward that overlapped scheduling launched before this step's sampling is enqueued. From pinned memory (a
    pageable copy of more than a few KB may wait for the stream too; the pinned block is kept until it ran)."""
    host = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def shape_logits(logits: Tensor, reqs: list[Request], pending: list[list[int]]) -> Tensor:
    """Grammar masks, then logit bias and min_tokens, then penalties, then thinking budgets, in one copy of the
    logits when any row asks for one (the raw logits stay as they are: logprobs are read from them)."""
    shaped = _Shaped(logits)
    _apply_grammars(shaped, reqs, pending)
    _apply_logit_bias(shaped, reqs, pending)
    _apply_penalties(shaped, reqs, pending)
    _apply_thinking_budgets(shaped, reqs, pending)
    return shaped.logits


class _Shaped:
    """The logits, copied the first time a stage writes them."""

    def __init__(self, logits: Tensor):
        self.logits, self._copied = logits, False

    def writable(self) -> Tensor:
        if not self._copied:
            self.logits, self._copied = self.logits.clone(), True
        return self.logits


def _apply_grammars(shaped: _Shaped, reqs: list[Request], pending: list[list[int]]) -> None:
    """Tokens a request's grammar forbids get -inf (one [R, V] mask, one copy to the device). A verify
    row's mask is the grammar's after the drafts before it (tentatively accepted, then rolled back)."""
    rows = [i for i, r in enumerate(reqs) if r.params.grammar is not None]
    if not rows:
        return
    logits = shaped.writable()
    mask = torch.stack([grammar_state(reqs[i], logits.shape[1]).allowed_after(pending[i]) for i in rows])
    idx = upload(rows, torch.long, logits.device)
    logits[idx] = logits[idx].masked_fill(~upload(mask, torch.bool, logits.device), float("-inf"))


def _apply_logit_bias(shaped: _Shaped, reqs: list[Request], pending: list[list[int]]) -> None:
    """OpenAI's logit_bias (added to the raw logits), and -inf for EOS and stop tokens while a request has
    fewer than min_tokens output tokens (a verify row counts the drafts before it), unless that would leave
    no token at all (a finished grammar allows only EOS): then the row is left as it was, on the device."""
    bias_rows = [i for i, r in enumerate(reqs) if r.params.logit_bias]
    banned_rows = [i for i, r in enumerate(reqs) if r.min_tokens_banned
                   and len(r.output_ids) + len(pending[i]) < r.params.min_tokens]
    if not (bias_rows or banned_rows):
        return
    logits = shaped.writable()
    dev = logits.device
    for i in bias_rows:
        pairs = reqs[i].params.logit_bias
        ids = _fixed(reqs[i], "bias_ids", dev, lambda: torch.tensor([t for t, _ in pairs]))
        logits[i, ids] += _fixed(reqs[i], "bias_values", dev, lambda: torch.tensor([b for _, b in pairs]))
    for i in banned_rows:
        banned = _fixed(reqs[i], "min_tokens_banned", dev, lambda: torch.tensor(reqs[i].min_tokens_banned))
        row = logits[i].index_fill(0, banned, float("-inf"))
        logits[i] = torch.where((row > float("-inf")).any(), row, logits[i])


def _apply_thinking_budgets(shaped: _Shaped, reqs: list[Request], pending: list[list[int]]) -> None:
    """A reasoning still open at its budget's output index (a verify row counts the drafts before it) ends there
    (or, where its bytes end inside a character, once the character has ended, at most GRACE_TOKENS later):
    `</think>` is the row's only token. Last, so that no bias or penalty can take it away; a grammar's reasoning
    takes `</think>` wherever a character has ended."""
    for i, req in enumerate(reqs):
        budget = req.params.thinking_budget
        if budget is None:
            continue
        at = len(req.output_ids) + len(pending[i])
        if at < budget.tokens:
            continue
        if req.thinking is None:  # (made by Engine.add_request with the tokenizer's bytes)
            req.thinking = ThinkingProgress(None)
        if not req.thinking.open_after(req.output_ids, pending[i], budget.end_id):
            continue
        if at < budget.tokens + GRACE_TOKENS and req.thinking.inside_character(req.output_ids, pending[i]):
            continue
        row = shaped.writable()[i]  # (fills of views: `row[end] = 0.0` copied the scalar over, a host sync)
        row.fill_(float("-inf"))
        row[budget.end_id:budget.end_id + 1].fill_(0.0)


def _fixed(req: Request, name: str, device: torch.device, make: Callable[[], Tensor]) -> Tensor:
    """A tensor of the request that never changes (bias ids, banned ids, the prompt's token mask): made and
    copied to the device once, not every step."""
    t = req.sampling_tensors.get(name)
    if t is None or t.device != device:
        made = make()
        t = req.sampling_tensors[name] = upload(made, made.dtype, device)
    return t


def _apply_penalties(shaped: _Shaped, reqs: list[Request], pending: list[list[int]]) -> None:
    """Repetition penalty over the prompt and output tokens (a positive logit divided by it, a negative one
    multiplied, as transformers and vLLM do), then frequency and presence penalties over the output."""
    rows = [i for i, r in enumerate(reqs) if r.params.frequency_penalty or r.params.presence_penalty
            or r.params.repetition_penalty != 1.0]
    if not rows:
        return
    logits = shaped.writable()
    dev, V = logits.device, logits.shape[1]
    for i in rows:
        req, p = reqs[i], reqs[i].params
        ids = req.output_ids + pending[i]
        history = upload(ids, torch.long, dev) if ids else None  # one copy for both uses
        if p.repetition_penalty != 1.0:  # a [V] mask of the tokens seen: no host sync (no unique / nonzero)
            seen = _fixed(req, "prompt_vocab", dev, lambda: _vocab_mask(req.prompt_ids, V)).clone()
            if history is not None:  # (index_fill_: `seen[history] = True` synced on CUDA, per the sync test)
                seen.index_fill_(0, history, True)
            score = logits[i]
            penalized = torch.where(score > 0, score / p.repetition_penalty, score * p.repetition_penalty)
            logits[i] = torch.where(seen, penalized, score)
        if history is None or not (p.frequency_penalty or p.presence_penalty):
            continue
        # (not bincount: on CUDA it reads the largest id back to size its output, a host sync)
        counts = torch.zeros(V, device=dev).index_add_(0, history, torch.ones(len(ids), device=dev))
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _vocab_mask(ids: list[int], vocab: int) -> Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask


def finite_above(scaled: Tensor) -> Tensor:
    """NaN as -inf (never drawn) and +inf as the largest float (the row's +inf tokens share its mass; inf - inf
    made the softmax NaN), as the Triton sampler reads them."""
    return scaled.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scaled.dtype).max, neginf=float("-inf"))


def filters_off(p: SamplingParams) -> bool:
    return p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0


def filter_probs(logits: Tensor, reqs: list[Request]) -> Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, one row per request. A filtered row keeps
    the tokens of probability >= its threshold: the largest value with at least top_k tokens, or top_p of
    the mass, at or above it, raised to min_p x the largest probability (every token at the threshold
    stays, ties included; the best token always does). Rows without filters are a softmax; only the others
    pay for sorting the vocabulary (on CUDA sample_tokens runs dsaserve.ops.triton.sampling instead)."""
    dev = logits.device
    temp = upload([max(r.params.temperature, MIN_TEMPERATURE) for r in reqs], torch.float32, dev)[:, None]
    probs = torch.softmax(finite_above(logits / temp), dim=-1)
    rows = [i for i, r in enumerate(reqs) if not filters_off(r.params)]
    if rows:
        idx = upload(rows, torch.long, dev)
        probs[idx] = _top_filtered(probs[idx], [reqs[i] for i in rows])
    return probs


def _top_filtered(probs: Tensor, reqs: list[Request]) -> Tensor:
    dev, V = probs.device, probs.shape[1]
    top_k = upload([min(r.params.top_k, V) if r.params.top_k > 0 else 0 for r in reqs], torch.long, dev)
    top_p = upload([r.params.top_p for r in reqs], torch.float64, dev)
    min_p = upload([r.params.min_p for r in reqs], torch.float32, dev)
    sorted_p = probs.sort(dim=-1, descending=True).values
    zero = torch.zeros_like(sorted_p[:, 0])
    by_k = torch.where(top_k > 0, sorted_p.gather(1, (top_k - 1).clamp(min=0)[:, None])[:, 0], zero)
    cum = sorted_p.double().cumsum(-1)
    reach = (cum < top_p[:, None] * cum[:, -1:]).sum(-1).clamp(max=V - 1)  # the rank whose mass reaches top_p
    by_p = torch.where(top_p < 1, sorted_p.gather(1, reach[:, None])[:, 0], zero)
    threshold = torch.maximum(torch.maximum(by_k, by_p), min_p * sorted_p[:, 0])
    filtered = torch.where(probs >= threshold[:, None], probs, 0.0)
    # The total from a scan, which runs each row on one thread: sum() splits a 32K+ row over threads when it is
    # the only row, so one filtered row would round apart from the same row beside others.
    return (filtered / filtered.double().cumsum(-1)[:, -1:]).to(filtered.dtype)


def sample_tokens(logits: Tensor, reqs: list[Request], pending: list[list[int]] | None = None) -> Tensor:
    """The sampled token of every row, on the device (no host sync for greedy rows); see sample()."""
    pending = pending if pending is not None else [[] for _ in reqs]
    shaped = shape_logits(logits, reqs, pending)
    random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if len(random_rows) < len(reqs):
        tokens = argmax(shaped)
    else:  # every row is drawn below
        tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
    if random_rows:
        uniforms = [row_uniform(reqs[i].seed, len(reqs[i].output_ids) + len(pending[i])) for i in random_rows]
        if shaped.is_cuda and shaped.dtype == torch.float32 and shaped.stride(-1) == 1:
            _sample_on_device(shaped, [reqs[i].params for i in random_rows], random_rows, uniforms, tokens)
        else:
            probs = filter_probs(shaped[random_rows], [reqs[i] for i in random_rows])
            tokens[upload(random_rows, torch.long, logits.device)] = draw(probs, uniforms)
    return tokens


def _sample_on_device(logits: Tensor, params: list[SamplingParams], rows: list[int], uniforms: list[float],
                      tokens: Tensor) -> None:
    """filter_probs + draw in Triton launches (the same kept set; no sort, no fp64 scan)."""
    from dsaserve.ops.triton.sampling import row_params, sample_rows
    temperatures = [max(p.temperature, MIN_TEMPERATURE) for p in params]
    sample_rows(logits, row_params(rows, temperatures, [p.top_k for p in params], [p.top_p for p in params],
                                   [p.min_p for p in params], uniforms, logits.device), tokens,
                filtered=not all(filters_off(p) for p in params))


def sample(logits: Tensor, reqs: list[Request], pending: list[list[int]] | None = None,
           ) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]] | None]:
    """logits [S, V] fp32, one row per entry of `reqs` -> tokens, and logprobs where asked.

    A request may own several consecutive rows (speculative verify): `pending[i]` are the tokens that
    precede row i's token in the output (the drafts before it). They count for grammars and penalties
    and set the output index that draws the row's uniform, so a row samples exactly what the
    non-speculative step at that output index would have sampled. Sampling commits nothing: the
    engine advances grammars by the tokens it keeps (dsaserve.chat.grammar.commit_tokens).
    """
    tokens = sample_tokens(logits, reqs, pending)
    if all(r.params.logprobs is None for r in reqs):
        return tokens.tolist(), None
    return tokens.tolist(), logprob_rows(logits, tokens, [r.params.logprobs or 0 for r in reqs]).lists()


def token_logprobs(logits: Tensor, tokens: list[int], tops: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the log-probability of `tokens[i]` under the raw logits and the `tops[i]` best
    (token, log-probability) pairs. Sampled tokens and prompt tokens (echo) are scored alike."""
    return logprob_rows(logits, upload(tokens, torch.long, logits.device), tops).lists()


@dataclass(frozen=True)
class LogprobRows:
    """Log-probabilities of a step's tokens, on the device until read: the chosen token's [R] and the best
    `tops[i]` (token, log-probability) pairs of row i (ids and values [R, max(tops)], best first)."""
    chosen: Tensor
    top_ids: Tensor
    top_values: Tensor
    tops: tuple[int, ...]

    def pinned_copy(self) -> LogprobRows:
        """The same on their way to pinned host memory (overlapped scheduling reads them with the tokens)."""
        def copy(t: Tensor) -> Tensor:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return LogprobRows(copy(self.chosen), copy(self.top_ids), copy(self.top_values), self.tops)

    def lists(self) -> list[tuple[float, list[tuple[int, float]]]]:
        chosen, ids, values = self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist()
        return [(c, list(zip(ids[i][:n], values[i][:n]))) for i, (c, n) in enumerate(zip(chosen, self.tops))]


def logprob_rows(logits: Tensor, tokens: Tensor, tops: list[int]) -> LogprobRows:
    """The log-probabilities of `tokens` (one per row, on the device) and the rows' best, without a host sync."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = logprobs.topk(max(tops, default=0), dim=-1)
    return LogprobRows(logprobs.gather(1, tokens[:, None])[:, 0], top.indices, top.values, tuple(tops))
