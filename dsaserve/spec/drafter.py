"""The MTP drafter: after the target's step, the MTP layer runs over the same rows (its caches catch
up: prompt chunks, or the verified rows), then S - 1 chained draft steps of one row per request.

Every sub-step is an ordinary plan through the one layout builder: the MTP pass reuses the target
step's layout with other logit rows (the last accepted row of each request), and each draft step is
a plan of one row per request at the next position. Draft tokens never leave the device between
draft steps, nor before the next step's launch: the next verify plan names them IN_FLIGHT, its launch
gathers them on the device (overlap.input_ids), and the leader reads them once that step runs.

Positions: an MTP row at position p reads (h_p, the token at p + 1) and predicts the token at p + 2.
If the last accepted row of a request is at p, the first draft is read there, and draft step j runs
at position p + j with the previous draft token and the previous MTP output as its hidden state.

Acceptance never reaches the host first: the leader decides it on the device (acceptance.launch_accept) and
sends its group the MTP pass's input ids and, per drafting request, a shift (accepted drafts - drafts verified)
by a device broadcast. The draft steps are planned from each request's last row, as if every draft were
accepted, and moved back by the shift on the device (BatchLayout.shifted), so the host launches the MTP pass
and every draft step before it reads the step's tokens.

Index sharing (GLM-5.2's config.json `index_share_for_mtp_iteration`): the MTP pass also returns the MTP layer's
top-k at the rows that draft, and every later draft step attends those slots without running the indexer, as
SGLang, vLLM and TensorRT-LLM do for that model (the slots of positions p + 1 on are not among them). The
`{"index_share_for_mtp_iteration": false}` model override turns it off.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable

import torch

from dsaserve.engine.acceptance import InFlight, Verdict
from dsaserve.engine.layout import DUMMY_RID, IN_FLIGHT, BatchLayout, StepMode, StepPlan
from dsaserve.engine.request import Request
from dsaserve.engine.sampler import upload

if TYPE_CHECKING:
    from dsaserve.engine.model_runner import ModelRunner, StepShape

Tensor = torch.Tensor


def drafting(plan: StepPlan) -> list[int]:
    """The requests that draft after the step: those whose last row samples (verify requests, last prompt chunks,
    and dummies that stand in for them). The plan alone says it, on every rank alike."""
    return [b for b, samples in enumerate(plan.samples) if samples]


def draft_input(requests: dict[str, Request], plan: StepPlan, real: int, verdict: Verdict | None,
                device: torch.device) -> Tensor:
    """The leader's MTP input for its group, on the device, without a host sync: [T + D] int64, the MTP pass's
    input id of every row (the token at the row's position + 1: a prompt chunk's next prompt token, else the row's
    sample; rows past a verify request's accepted run get its later samples, overwritten later), then per
    drafting request its shift: accepted drafts - drafts verified (<= 0), where its accepted run ends against
    the end of its rows (draft_rows). Without a verdict (a failed sampling, dummy rows) every id is 0 and no
    request shifts."""
    known: list[int] = []
    for b, (rid, prefix, q) in enumerate(zip(plan.rids, plan.prefix_lens, plan.q_lens)):
        req = requests.get(rid) if b < real and verdict is not None and not plan.num_drafts[b] else None
        ahead = req.token_slice(prefix + 1, prefix + q + 1) if req is not None else []
        known += ahead + [0] * (q - len(ahead))
    chosen = drafting(plan)
    if verdict is None:
        return torch.zeros(len(known) + len(chosen), dtype=torch.long, device=device)  # (made there: no copy)
    place = {plan.rids[b]: i for i, b in enumerate(chosen) if b < real}
    ends = dict(zip(plan.rids[:real], itertools.accumulate(plan.q_lens)))
    rows: list[int] = []  # each chain's rows: its request's last n
    for req, n in verdict.chains:
        rows += range(ends[req.rid] - n, ends[req.rid])
    slots = [place[req.rid] for req, _ in verdict.chains]
    host = upload(known + rows + slots + [1 - n for _, n in verdict.chains], torch.long, device)
    T, R, C = len(known), len(rows), len(slots)
    ids = host[:T].index_copy(0, host[T:T + R], verdict.tokens)
    shift = torch.zeros(len(chosen), dtype=torch.long, device=ids.device)
    shift.index_add_(0, host[T + R:T + R + C], verdict.accepted + host[T + R + C:])
    return torch.cat([ids, shift])


def drafts_in_flight(requests: dict[str, Request], plan: StepPlan, real: int, drafts: Tensor) -> InFlight:
    """The step's drafts [drafting requests, S] (device) as the next step's tokens in flight: each drafting
    request still running takes S IN_FLIGHT drafts (rows of dummies and finished requests: None)."""
    owners: list[Request | None] = []
    for b in drafting(plan):
        req = requests.get(plan.rids[b]) if b < real else None
        if req is not None:
            req.draft_ids = [IN_FLIGHT] * drafts.shape[1]
        owners.append(req)
    return InFlight.of(owners, drafts)


def settle_drafts(requests: dict[str, Request], drafts: InFlight,
                  override: Callable[[Request, list[int]], list[int]] | None = None) -> None:
    """Read a step's drafts into the requests that still wait for them (`override`: tests and benchmarks
    replace them). If reading fails, those requests drop their drafts (and draft again, as after a retraction) and
    the error goes on to the caller: a step that verified them fails."""
    owners = [r for r in drafts.requests
              if r is not None and requests.get(r.rid) is r and r.draft_ids[:1] == [IN_FLIGHT]]
    try:
        rows = dict(zip((id(r) for r in drafts.requests), drafts.read()))
        for req in owners:
            req.draft_ids = rows[id(req)] if override is None else override(req, rows[id(req)])
    finally:
        for req in owners:
            if req.draft_ids[:1] == [IN_FLIGHT]:
                req.draft_ids = []


def draft_rows(plan: StepPlan) -> list[int]:
    """Per drafting request, the row of its step the draft steps are planned from: its last row (as if every
    draft were accepted; its shift moves it back to where its accepted run ends), or a dummy's first chain row
    (a dummy never shifts, and its pages need not reach past its rows)."""
    return [plan.q_lens[b] - 1 - (plan.num_drafts[b] if plan.rids[b] == DUMMY_RID else 0) for b in drafting(plan)]


def draft_plan(plan: StepPlan, step: int) -> StepPlan:
    """Chained draft step `step` (1..S-1): one row per drafting request at position draft_rows + step; the
    layout moves each request by its shift on the device (BatchLayout.shifted)."""
    chosen = drafting(plan)
    return StepPlan(StepMode.DRAFT, tuple(plan.rids[b] for b in chosen), tuple(plan.pages[b] for b in chosen),
                    tuple(plan.prefix_lens[b] + row + step for b, row in zip(chosen, draft_rows(plan))),
                    (1,) * len(chosen), (1,) * len(chosen), (True,) * len(chosen), (), (0,) * len(chosen))


def mtp_rows(plan: StepPlan) -> list[int]:
    """The step's row of draft_rows of each drafting request (the MTP pass reads it, moved by the shift)."""
    starts = [0, *itertools.accumulate(plan.q_lens)]
    return [starts[b] + row for b, row in zip(drafting(plan), draft_rows(plan))]


class MTPDrafter:
    def __init__(self, runner: ModelRunner, steps: int):
        self.runner, self.steps = runner, steps

    def run(self, plan: StepPlan, layout: BatchLayout, hidden: Tensor, given: Tensor | None,
            shape: StepShape) -> Tensor:
        """Draft tokens [requests with a draft, S] (device) after the target step `plan`/`layout`, launched
        before the host knows what was accepted: `given` is the group leader's draft_input (other ranks: None;
        it reaches them by a broadcast on the device)."""
        runner = self.runner
        dev = hidden.device
        T, D = layout.num_tokens, len(drafting(plan))
        packed = given if given is not None else torch.empty(T + D, dtype=torch.long, device=dev)
        if T + D:  # (an idle DP group without graphs has no rows: every rank of the group skips alike)
            runner.par.broadcast_attn(packed)
        ids, shift = packed[:T], packed[T:].to(torch.int32)
        rows = upload(mtp_rows(plan), torch.int32, dev) + shift
        graphed = shape.graph_batch is not None
        h, logits, *first_topk = runner.draft(ids, hidden, layout.with_logit_rows(rows), graphed)
        drafts = [logits.argmax(-1)]
        if self.steps > 1 and sum(shape.draft_sizes) > 0:
            for step in range(1, self.steps):
                _, draft_layout = runner.prepare(draft_plan(plan, step), shape.for_drafts())
                moved = runner.checked(draft_layout.shifted(_padded(shift, draft_layout.batch_size)))
                h, logits = runner.draft(drafts[-1], h, moved, graphed, *first_topk)
                drafts.append(logits.argmax(-1))
        return torch.stack(drafts, dim=1)


def _padded(shift: Tensor, batch: int) -> Tensor:
    """The shifts of the drafting requests, then 0 for a graph's padding requests."""
    return torch.nn.functional.pad(shift, (0, batch - shift.shape[0]))
