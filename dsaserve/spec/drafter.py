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

Index sharing (GLM-5.2's config.json `index_share_for_mtp_iteration`): the MTP pass also returns the MTP layer's
top-k at the rows that draft, and every later draft step attends those slots without running the indexer, as
SGLang, vLLM and TensorRT-LLM do for that model (the slots of positions p + 1 on are not among them). The
`{"index_share_for_mtp_iteration": false}` model override turns it off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from dsaserve.engine.layout import IN_FLIGHT, BatchLayout, StepMode, StepPlan
from dsaserve.engine.overlap import InFlight
from dsaserve.engine.request import Request

if TYPE_CHECKING:
    from dsaserve.engine.model_runner import ModelRunner, StepShape

Tensor = torch.Tensor


@dataclass(frozen=True)
class DraftInput:
    """What the leader decided after sampling, for every rank of its group: the MTP pass's input token
    of every row (the token at the row's position + 1) and, per request, the row offset of its last
    accepted token (-1: the request takes no draft this step, e.g. a prompt chunk that is not its last)."""
    input_ids: tuple[int, ...]
    last_rows: tuple[int, ...]


def draft_input(requests: dict[str, Request], plan: StepPlan, real: int, accepted: dict[str, tuple]) -> DraftInput:
    """Per row, the token at its position + 1 (the MTP pass's input); per request, the row offset of its
    last accepted token, or -1 when it takes no draft (a prompt chunk that is not its last)."""
    ids: list[int] = []
    last_rows: list[int] = []
    for b, (rid, prefix, q) in enumerate(zip(plan.rids, plan.prefix_lens, plan.q_lens)):
        if b >= real:  # a dummy request: drafts when it samples (as many as its group announced)
            ids += [0] * q
            last_rows.append(0 if plan.samples[b] else -1)
        elif plan.num_drafts[b]:  # a verify request: rows past the accepted run are overwritten later
            new = accepted[rid][0]
            ids += new + [0] * (q - len(new))
            last_rows.append(len(new) - 1)
        else:  # a prompt chunk: the following known tokens, then the sampled one if it finished
            known = requests[rid].token_slice(prefix + 1, prefix + q + 1)
            ids += known + accepted[rid][0] if rid in accepted else known
            last_rows.append(q - 1 if rid in accepted else -1)
    return DraftInput(tuple(ids), tuple(last_rows))


def drafts_in_flight(requests: dict[str, Request], plan: StepPlan, real: int, given: DraftInput,
                     drafts: Tensor) -> InFlight:
    """The step's drafts [drafting requests, S] (device) as the next step's tokens in flight: each drafting
    request still running takes S IN_FLIGHT drafts (rows of dummies and finished requests: None)."""
    owners: list[Request | None] = []
    for b, (rid, last) in enumerate(zip(plan.rids, given.last_rows)):
        if last >= 0:
            req = requests.get(rid) if b < real else None
            if req is not None:
                req.draft_ids = [IN_FLIGHT] * drafts.shape[1]
            owners.append(req)
    return InFlight.of(owners, drafts)


def settle_drafts(requests: dict[str, Request], drafts: InFlight,
                  override: Callable[[Request, list[int]], list[int]] | None = None) -> None:
    """Read a step's drafts into the requests that still wait for them (`override`: tests and benchmarks
    replace them). If reading fails, those requests drop their drafts (and draft again, as after a retraction)."""
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


def draft_plan(plan: StepPlan, last_rows: tuple[int, ...], step: int) -> StepPlan:
    """Chained draft step `step` (1..S-1): one row per drafting request at position p + step."""
    chosen = [b for b, off in enumerate(last_rows) if off >= 0]
    return StepPlan(StepMode.DRAFT, tuple(plan.rids[b] for b in chosen), tuple(plan.pages[b] for b in chosen),
                    tuple(plan.prefix_lens[b] + last_rows[b] + step for b in chosen), (1,) * len(chosen),
                    (1,) * len(chosen), (True,) * len(chosen), (), (0,) * len(chosen))


def mtp_rows(plan: StepPlan, last_rows: tuple[int, ...]) -> list[int]:
    rows, start = [], 0
    for q, off in zip(plan.q_lens, last_rows):
        if off >= 0:
            rows.append(start + off)
        start += q
    return rows


class MTPDrafter:
    def __init__(self, runner: ModelRunner, steps: int):
        self.runner, self.steps = runner, steps

    def run(self, plan: StepPlan, layout: BatchLayout, hidden: Tensor, given: DraftInput | None,
            shape: StepShape) -> Tensor:
        """Draft tokens [requests with a draft, S] (device) after the target step `plan`/`layout`."""
        runner = self.runner
        given = runner.par.broadcast_from_leader(given)
        dev = hidden.device
        rows = torch.tensor(mtp_rows(plan, given.last_rows), dtype=torch.int32).to(dev, non_blocking=True)
        ids = torch.tensor(given.input_ids, dtype=torch.long).to(dev, non_blocking=True)
        graphed = shape.graph_batch is not None
        h, logits, *first_topk = runner.draft(ids, hidden, layout.with_logit_rows(rows), graphed)
        drafts = [logits.argmax(-1)]
        if self.steps > 1 and sum(shape.draft_sizes) > 0:
            for step in range(1, self.steps):
                _, draft_layout = runner.prepare(draft_plan(plan, given.last_rows, step), shape.for_drafts())
                h, logits = runner.draft(drafts[-1], h, draft_layout, graphed, *first_topk)
                drafts.append(logits.argmax(-1))
        return torch.stack(drafts, dim=1)
