"""From a step's logits to each request's new tokens: which rows sample, prompt scoring (echo /
prompt_logprobs), and speculative acceptance. The leader runs it; the engine commits the result."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsaserve.engine.layout import StepPlan
from dsaserve.engine.request import Request
from dsaserve.engine.sampler import LogprobRows, logprob_rows, sample_tokens, token_logprobs, upload

Tensor = torch.Tensor


@dataclass
class InFlight:
    """The tokens of one launched step, one per request that samples (or a row of MTP drafts per drafting
    request; None: a dummy's): on the device (the next step's input ids are gathered from them) and on their
    way to pinned host memory (`ready` marks the copy)."""
    requests: list[Request | None]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: LogprobRows | None = None  # (on their way to the host with the tokens)

    @staticmethod
    def of(requests: list[Request | None], tokens: torch.Tensor, logprobs: LogprobRows | None = None) -> InFlight:
        if not tokens.is_cuda:
            return InFlight(requests, tokens, tokens, None, logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        logprobs = logprobs.pinned_copy() if logprobs is not None else None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))  # the stream the copy was queued on
        return InFlight(requests, tokens, host, ready, logprobs)

    def read(self) -> list[int]:
        """Waits for this step's sampling only, not for any step launched after it."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass(frozen=True)
class Verdict:
    """A step's sampling and speculative acceptance, decided on the device and on their way to the host: the
    sampled token of every row that yields one, and per chain (a request's rows that yield tokens) how many
    of its drafts were accepted (`accepted`, on the device: the MTP pass reads it before the host does)."""
    chains: list[tuple[Request, int]]
    tokens: Tensor  # [R] the sampled tokens, chain after chain
    accepted: Tensor  # [C] accepted drafts per chain: its leading rows whose sample equals the next draft
    flight: InFlight  # tokens then `accepted`, with the log-probabilities where asked, to pinned memory

    def read(self) -> dict[str, tuple]:
        """Each request's new tokens (and logprobs): the accepted drafts, then the sample of the row after them
        (the bonus token). Waits for this step's sampling, not for anything launched after it."""
        values = self.flight.read()
        tokens, counts = values[:len(values) - len(self.chains)], values[len(values) - len(self.chains):]
        logprobs = self.flight.logprobs.lists() if self.flight.logprobs is not None else None
        out, row = {}, 0
        for (req, n), k in zip(self.chains, counts):
            out[req.rid] = (tokens[row:row + k + 1], logprobs[row:row + k + 1] if logprobs is not None else None)
            row += n
        return out


def launch_accept(requests: dict[str, Request], plan: StepPlan, real: int, logits: Tensor) -> Verdict:
    """Sample each real request's rows and decide acceptance on the device (no host sync, except where a request
    scores its prompt: echo / prompt_logprobs, score_prompt). A verify request
    keeps the drafts up to the first row whose own sample differs, then that row's sample (the bonus token).
    Each row samples with the (seed, output index) uniform of a non-speculative step, so the tokens are
    exactly the non-speculative ones; for top-1 drafts this is speculative rejection sampling, coupled
    (a draft is accepted with the target's probability of it)."""
    logits, row_reqs, pending, chains = sampled_rows(requests, plan, real, logits)
    tokens = sample_tokens(logits, row_reqs, pending)
    accepted = accepted_drafts(tokens, chains)
    logprobs = (logprob_rows(logits, tokens, [r.params.logprobs or 0 for r in row_reqs])
                if any(r.params.logprobs is not None for r in row_reqs) else None)
    flight = InFlight.of(row_reqs, torch.cat([tokens, accepted.to(tokens.dtype)]), logprobs)
    return Verdict(chains, tokens, accepted, flight)


def accepted_drafts(tokens: Tensor, chains: list[tuple[Request, int]]) -> Tensor:
    """[C] per chain of n rows, the leading rows whose sample equals the draft the next row verified (at most
    n - 1): a cumulative product over each chain's matches, padded to the longest chain."""
    width = max((n for _, n in chains), default=0)
    if width <= 1:
        return torch.zeros(len(chains), dtype=torch.long, device=tokens.device)
    sentinel = tokens.shape[0]  # a row that never matches
    index, expected = [], []
    row = 0
    for req, n in chains:
        index += [row + j if j < n - 1 else sentinel for j in range(width)]
        expected += (req.draft_ids[:n - 1] + [-1] * n)[:n]  # (a request whose drafts were lost matches none)
        row += n
    host = upload(index + expected, torch.long, tokens.device)
    index_t, expected_t = host[:len(index)], host[len(index):]
    matches = torch.cat([tokens == expected_t, torch.zeros(1, dtype=torch.bool, device=tokens.device)])
    return matches[index_t].view(len(chains), width).long().cumprod(1).sum(1)


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
