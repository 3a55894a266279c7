"""How the ranks agree on every step before any kernel runs (Engine.step, and Overlap.step on a leader that
overlaps): the leader's plan to its group, every rank's counts to every rank, and where each rank's last step
failed, so that a step that failed on some ranks only stops them all instead of leaving them out of step."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dsaserve.engine.layout import StepMode, StepPlan
from dsaserve.engine.model_runner import StepShape

if TYPE_CHECKING:
    from dsaserve.engine.engine import Engine


class StepFailedOnSomeRanks(RuntimeError):
    """A step raised on some ranks only (or at different points): their states differ, every rank stops."""


def sync(engine: Engine, plan: StepPlan | None, keep_alive: bool = False, stop: bool = False,
         epoch: int = 0) -> tuple[StepPlan | None, StepShape]:
    """Leader's plan to its group; every rank's (rows, drafting requests, graph vote, has work, stop, where its
    last step failed, wake-up epoch, where it failed among the shared collectives) to every rank, so all ranks
    agree on the step's shape before any kernel runs. Raises StepFailedOnSomeRanks, on every rank, unless the
    last step failed on no rank or on every rank at the same point."""
    par, runner, spec = engine.par, engine.runner, engine.spec_steps
    arrived, engine.arrived_pages = engine.arrived_pages, []
    plan, arrived = _share_plan(engine, plan, arrived)
    if arrived:  # a prefill server wrote these into the group leader's pool only
        runner.pools.copy_pages_from_leader(arrived, par.broadcast_attn)
    graph_mode = StepMode.VERIFY if spec else StepMode.DECODE
    drafting = sum(plan.samples) if plan is not None and spec else 0  # requests that draft
    mine = [plan.num_tokens if plan else 0, drafting, runner.graph_batch_of(plan, graph_mode),
            int(keep_alive or engine.has_work(compiling=False)), int(stop), engine.failed_at, epoch,
            engine.failed_shared]
    everyone = par.exchange(mine)
    check_failures([r[5] for r in everyone], [r[7] for r in everyone], par.cfg.attn_tp, engine.steps)
    engine.failed_at = engine.failed_shared = 0
    leaders = everyone[:: par.cfg.attn_tp]  # one row per DP group
    rows = tuple(r[0] for r in leaders)
    votes = [r[2] for r in leaders]
    graph_batch = runner.graphs.batch_bucket(max(votes)) if min(votes) >= 0 and sum(rows) > 0 else None
    return plan, StepShape(rows, tuple(r[1] for r in leaders), graph_batch, graph_mode, 1 + spec,
                           any(r[3] for r in leaders), any(r[4] for r in leaders), min(r[6] for r in leaders))


def _share_plan(engine: Engine, plan: StepPlan | None, arrived: list[int]) -> tuple[StepPlan | None, list[int]]:
    """The leader's plan, and the pages a prefill server wrote into its pool, on every rank of its group; the plan's
    page ids travel as what changed since the last step (engine/page_sync.py)."""
    par = engine.par
    if par.cfg.attn_tp == 1:
        return plan, arrived
    leader = par.cfg.is_leader
    plain, deltas = engine.page_sender.encode(plan, engine.requests) if leader and plan else (plan, None)
    got, deltas, arrived = par.broadcast_from_leader((plain, deltas, arrived))
    if leader:
        return plan, arrived
    return (engine.page_receiver.decode(got, deltas) if got is not None else None), arrived


def check_failures(failed_at: list[int], failed_shared: list[int], attn_tp: int, step: int) -> None:
    """failed_at per rank: 0, or 1 + the collectives it entered before its last step raised, negative when its
    group then stood in for its rows; failed_shared: where it stood then among the collectives every group joins.
    The ranks of a group must agree on all their collectives; the groups that did not stand in, on whether they
    failed and at which of the shared ones (a group's own collectives follow its rows: a prefill may split them
    over its ranks where another group's rows do not)."""
    starts = range(0, len(failed_at), attn_tp)
    within = any(len(set(failed_at[g:g + attn_tp])) > 1 for g in starts)
    across = {failed_shared[g] if failed_at[g] else 0 for g in starts if failed_at[g] >= 0}
    if within or len(across) > 1:
        failed = [rank for rank, at in enumerate(failed_at) if at]
        how = "only" if 0 in failed_at else f"after different collectives {[abs(at) - 1 for at in failed_at]}"
        raise StepFailedOnSomeRanks(f"step {step} failed on rank(s) {failed} {how}; the ranks no longer agree, "
                                    f"so every rank stops (see the failing rank's log)")


def follow(engine: Engine) -> None:
    """A rank that is not its group's leader (the server's ranks, bench one-batch's): run the leader's plans until
    any rank asks every rank to stop."""
    while not engine.last_sync.any_stop:
        engine.step()
