"""Overlapped scheduling (no speculation, no PD; on every DP group leader, TP and DP attention included):
the host schedules step N + 1 while the device runs step N, and commits step N's tokens while the device
runs step N + 1.

A step's sampled tokens stay on the device until the next step needs them. The scheduler plans the
next step with the next row of each request whose token is in flight (`Request.inflight`, input id
IN_FLIGHT); the host then waits for those tokens (the one host sync per step), writes them into the
plan, launches it, and commits the previous tokens (stop rules, outputs, freed pages) while it runs.
The new step's sampling is enqueued after that commit, so grammars, penalties and seeded uniforms
see every earlier token, and the tokens are those of the engine without overlap.

The cost: a request that stops on a token (EOS, a stop string) or is aborted computes one more row,
thrown away; a request that ends by length is known ahead and takes none. Its pages are freed while
that row may still be written: every later step runs after it on the same stream.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsaserve.engine.acceptance import sampled_rows
from dsaserve.engine.layout import IN_FLIGHT, StepPlan
from dsaserve.engine.request import Request, RequestOutput
from dsaserve.engine.sampler import sample, sample_tokens

if TYPE_CHECKING:
    from dsaserve.engine.engine import Engine


@dataclass
class InFlight:
    """The tokens of one launched step, one per request that samples."""
    requests: list[Request]
    tokens: torch.Tensor | list[int]  # on the device; a host list when logprobs were asked (read at once)
    logprobs: list | None = None

    def read(self) -> list[int]:
        return self.tokens.tolist() if isinstance(self.tokens, torch.Tensor) else self.tokens


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
        tokens = prev.read() if prev is not None else []  # waits for the previous step's tokens
        if plan is not None:
            plan = with_inflight_ids(plan, {r.rid: t for r, t in zip(prev.requests, tokens)} if prev else {})
        plan, engine.last_sync = engine.sync(plan, keep_alive, stop, epoch)
        logits, error, issued = None, None, engine.par.issued
        if sum(engine.last_sync.dp_sizes) > 0:
            try:
                logits = self._launch(plan or StepPlan.idle())  # an idle group joins the others' collectives
            except Exception as exc:  # noqa: BLE001 - its requests end with the error once the last tokens are in
                error = exc
        if prev is not None:
            outputs += self._commit(prev, tokens)
        if error is not None:
            outputs += engine.fail_step(plan or StepPlan.idle(), error, issued)
        elif logits is not None and plan is not None:
            self.inflight, failed = self._sample(plan, logits)
            outputs += failed
        return outputs

    def _launch(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's forward (asynchronously on a GPU); the logits of its logit rows."""
        engine = self.engine
        run, layout = engine.runner.prepare(plan, engine.last_sync)
        ids = torch.tensor(run.input_ids, dtype=torch.long).to(engine.runner.device, non_blocking=True)
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
            if any(r.params.logprobs is not None for r in reqs):  # the logits are read now
                tokens, logprobs = sample(rows, reqs, pending)
                return InFlight(reqs, tokens, logprobs), []
            return InFlight(reqs, sample_tokens(rows, reqs, pending)), []
        except Exception as exc:  # noqa: BLE001 - the plan's requests end with the error
            return None, engine.fail_step(plan, exc, issued)

    def _commit(self, prev: InFlight, tokens: list[int]) -> list[RequestOutput]:
        engine = self.engine
        outputs = []
        for i, req in enumerate(prev.requests):
            req.inflight -= 1
            if engine.requests.get(req.rid) is req:  # not aborted or failed meanwhile
                lps = [prev.logprobs[i]] if prev.logprobs is not None else None
                outputs.append(engine.commit_new_tokens(req, [tokens[i]], lps))
        return outputs


def with_inflight_ids(plan: StepPlan, tokens: dict[str, int]) -> StepPlan:
    """The plan with each IN_FLIGHT input id (a decode row's token, sampled by the previous step) filled in."""
    if IN_FLIGHT not in plan.input_ids:
        return plan
    ids, row = list(plan.input_ids), 0
    for rid, q in zip(plan.rids, plan.q_lens):
        if ids[row] == IN_FLIGHT:
            ids[row] = tokens[rid]
        row += q
    return dataclasses.replace(plan, input_ids=tuple(ids))
