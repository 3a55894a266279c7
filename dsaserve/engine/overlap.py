"""Overlapped scheduling (no speculation, no PD; on every DP group leader, TP and DP attention included):
the host schedules and launches step N + 1 while the device runs step N, and commits step N's tokens
while the device runs step N + 1.

A step's sampled tokens stay on the device. The scheduler plans the next step with the next row of each
request whose token is in flight (`Request.inflight`, input id IN_FLIGHT); the launch gathers those ids
on the device from the previous step's tokens (the group leader's; its group receives the filled ids by
broadcast), so nothing waits for them. Then the host waits for the previous step's tokens (an event on
their copy to pinned memory, with their log-probabilities where asked: the one host sync per step; it does
not wait for the step just launched)
and commits them (stop rules, outputs, freed pages) while the new step runs. The new step's sampling is
enqueued after that commit, so grammars, penalties and seeded uniforms see every earlier token, and the
tokens are those of the engine without overlap.

The cost: a request that stops on a token (EOS, a stop string) or is aborted computes one more row,
thrown away; a request that ends by length is known ahead and takes none. Its pages are freed while
that row may still be written: every later step runs after it on the same stream.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsaserve.engine import lockstep
from dsaserve.engine.acceptance import InFlight, sampled_rows
from dsaserve.engine.layout import IN_FLIGHT, StepPlan
from dsaserve.engine.request import RequestOutput
from dsaserve.engine.sampler import logprob_rows, sample_tokens

if TYPE_CHECKING:
    from dsaserve.engine.engine import Engine
    from dsaserve.parallel.groups import Parallel


class Overlap:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.inflight: InFlight | None = None

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def step(self, keep_alive: bool = False, stop: bool = False, epoch: int = 0) -> list[RequestOutput]:
        """Engine.step on a DP group leader (the group's other ranks run Engine.step as ever: they get
        the plan with its tokens filled in)."""
        engine = self.engine
        outputs = engine.take_finished()
        plan = engine.scheduler.schedule()  # the device may still run the previous step
        prev, self.inflight = self.inflight, None
        plan, engine.last_sync = lockstep.sync(engine, plan, keep_alive, stop, epoch)
        logits, error, issued, shared = None, None, engine.par.issued, engine.par.shared
        if sum(engine.last_sync.dp_sizes) > 0:
            try:
                logits = self._launch(plan or StepPlan.idle(), prev)  # an idle group joins the others' collectives
            except Exception as exc:  # noqa: BLE001 - its requests end with the error once the last tokens are in
                error = exc
        if prev is not None:
            outputs += self._commit(prev, prev.read())  # waits for the previous step; the new one runs
        if error is not None:
            outputs += engine.fail_step(plan or StepPlan.idle(), error, issued, shared)
        elif logits is not None and plan is not None:
            self.inflight, failed = self._sample(plan, logits)
            outputs += failed
        return outputs

    def _launch(self, plan: StepPlan, prev: InFlight | None) -> torch.Tensor:
        """Run the plan's forward (asynchronously on a GPU); the logits of its logit rows."""
        engine = self.engine
        run, layout = engine.runner.prepare(plan, engine.last_sync)
        ids = input_ids(run, engine.runner.device, engine.par, prev)
        _, logits = engine.runner.target(ids, layout, engine.last_sync.graph_batch is not None)
        engine.steps += 1
        engine.scheduler.advance(plan, engine.requests)  # the rows' caches are written, whatever is sampled
        for rid, samples in zip(plan.rids, plan.samples):
            if samples:  # 2 until the previous step's token of the same request is committed below
                engine.requests[rid].inflight += 1
        return logits

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> tuple[InFlight | None, list[RequestOutput]]:
        engine = self.engine
        issued = engine.par.issued
        try:
            rows, reqs, pending, _ = sampled_rows(engine.requests, plan, len(plan.rids), logits)
            if not reqs:
                return None, []
            tokens = sample_tokens(rows, reqs, pending)
            logprobs = (logprob_rows(rows, tokens, [r.params.logprobs or 0 for r in reqs])
                        if any(r.params.logprobs is not None for r in reqs) else None)  # read with the tokens
            return InFlight.of(reqs, tokens, logprobs), []
        except Exception as exc:  # noqa: BLE001 - the plan's requests end with the error; the ranks go on
            return None, engine.fail_step(plan, exc, issued, local=engine.par.issued == issued)

    def _commit(self, prev: InFlight, tokens: list[int]) -> list[RequestOutput]:
        engine = self.engine
        outputs = []
        logprobs = prev.logprobs.lists() if prev.logprobs is not None else None  # (read: the tokens' event passed)
        for i, req in enumerate(prev.requests):  # every entry a request here (None only among MTP drafts)
            req.inflight -= 1
            if engine.requests.get(req.rid) is req:  # not aborted or failed meanwhile
                lps = [logprobs[i]] if logprobs is not None else None
                outputs.append(engine.commit_new_tokens(req, [tokens[i]], lps))
        return outputs


def inflight_rows(plan: StepPlan) -> list[tuple[int, str, int]]:
    """(row, rid, k) of each input id still in flight, k counting a request's such rows: a decode row's token
    sampled by the previous step (overlapped scheduling), or a verify row's MTP draft (Engine._drafts)."""
    found: list[tuple[int, str, int]] = []
    if IN_FLIGHT not in plan.input_ids:
        return found
    row = 0
    for rid, q, drafts in zip(plan.rids, plan.q_lens, plan.num_drafts):
        if q <= 1 + drafts:  # a decode or verify request (prompt chunks take known tokens)
            k = 0  # (overlap runs without MTP: a request's in-flight ids are its token or its drafts, never both)
            for r in range(row, row + q):
                if plan.input_ids[r] == IN_FLIGHT:
                    found.append((r, rid, k))
                    k += 1
        row += q
    return found


def input_ids(plan: StepPlan, device: torch.device, par: Parallel, prev: InFlight | None = None) -> torch.Tensor:
    """The step's input ids on the device, without waiting for any. Ids in flight are gathered on the device
    by the group leader from `prev` (the k-th in-flight id of a request from its row of prev.tokens), whose
    group receives them by broadcast (the other ranks hold no tokens)."""
    rows = inflight_rows(plan)
    ids: tuple[int, ...] | list[int] = plan.input_ids
    if rows and prev is not None:
        width = prev.tokens.shape[1] if prev.tokens.dim() == 2 else 1  # 1 sampled token, or S drafts, per request
        index = {req.rid: i for i, req in enumerate(prev.requests) if req is not None}
        ids = list(ids)
        for row, rid, k in rows:
            ids[row] = -1 - (index[rid] * width + k)  # which of prev's tokens
    out = torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
    if rows:
        if prev is not None:
            out = torch.where(out < 0, prev.tokens.reshape(-1).to(torch.long)[(-1 - out).clamp_(min=0)], out)
        par.broadcast_attn(out)
    return out
