"""From a step's logits to each request's new tokens: which rows sample, prompt scoring (echo /
prompt_logprobs), and speculative acceptance. The leader runs it; the engine commits the result."""
from __future__ import annotations

import torch

from dsaserve.engine.layout import StepPlan
from dsaserve.engine.request import Request
from dsaserve.engine.sampler import sample, token_logprobs, upload

Tensor = torch.Tensor


def accept(requests: dict[str, Request], plan: StepPlan, real: int, logits: Tensor) -> dict[str, tuple]:
    """Each real request's sampled rows -> its new tokens (and logprobs). A verify request keeps the
    drafts up to the first row whose own sample differs, then that row's sample (the bonus token).
    Each row samples with the (seed, output index) uniform of a non-speculative step, so the tokens are
    exactly the non-speculative ones; for top-1 drafts this is speculative rejection sampling, coupled
    (a draft is accepted with the target's probability of it)."""
    logits, row_reqs, pending, chains = sampled_rows(requests, plan, real, logits)
    tokens, logprobs = sample(logits, row_reqs, pending)
    accepted, row = {}, 0
    for req, n in chains:
        drafts, k = req.draft_ids, 0
        while k < n - 1 and tokens[row + k] == drafts[k]:
            k += 1
        accepted[req.rid] = (tokens[row:row + k + 1], logprobs[row:row + k + 1] if logprobs is not None else None)
        row += n
    return accepted


def sampled_rows(requests: dict[str, Request], plan: StepPlan, real: int, logits: Tensor
                 ) -> tuple[Tensor, list[Request], list[list[int]], list[tuple[Request, int]]]:
    """The logit rows that yield tokens, their requests and pending drafts, and (request, rows) per
    request with a token to sample; rows before those score the prompt (echo / prompt_logprobs) here.
    Requests that ended since the plan was made (overlapped scheduling) are skipped."""
    row_reqs, pending, rows, chains, row = [], [], [], [], 0
    for rid, prefix, q, n, samples, drafts in zip(plan.rids[:real], plan.prefix_lens, plan.q_lens,
                                                  plan.logit_counts, plan.samples, plan.num_drafts):
        req = requests.get(rid)
        chain = drafts + 1 if drafts else int(samples)  # rows that yield output tokens
        if req is not None:
            if n > chain:  # the rows before score the prompt (echo / prompt_logprobs)
                score_prompt(req, logits[row:row + n - chain], prefix + q - n)
            if chain:
                rows += range(row + n - chain, row + n)
                row_reqs += [req] * chain
                pending += [req.draft_ids[:i] for i in range(chain)]
                chains.append((req, chain))
        row += n
    leading = rows == list(range(len(rows)))  # decode (graph padding after): a view, no index upload
    picked = logits[:len(rows)] if leading else logits[upload(rows, torch.long, logits.device)]  # (no host sync)
    return picked, row_reqs, pending, chains


def score_prompt(req: Request, logits: Tensor, first_pos: int) -> None:
    """Log-probabilities of prompt tokens from rows at positions first_pos.. (row i predicts the token
    at first_pos + i + 1); each prompt token is scored once, retraction or not."""
    start = len(req.prompt_logprobs) - first_pos  # the first row whose target is not scored yet
    end = min(len(req.prompt_ids) - 1 - first_pos, logits.shape[0])
    if start < end:
        targets = req.prompt_ids[first_pos + 1 + start:first_pos + 1 + end]
        req.prompt_logprobs += token_logprobs(logits[start:end], targets, [req.params.prompt_logprobs] * len(targets))
