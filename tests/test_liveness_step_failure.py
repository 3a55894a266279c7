"""A batch that raises on every rank ends that step's requests with an error and the ranks go on
(TP and DP attention), as does one that raises in one DP group before the collectives the groups share;
a batch that raises on one rank only stops every rank, promptly, with a message naming it. The failure
is injected into the real ModelRunner of each rank process."""
from __future__ import annotations

import functools

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.model_runner import ModelRunner
from dsaserve.parallel.launch import Job, OfflineRequest, run_jobs
from dsaserve.server_args import ServerArgs

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
POISON = prompts_ids(1, [37], seed=5)[0]  # the only step with 37 rows: it runs alone, first
PROMPTS = prompts_ids(4, [5, 30, 12, 21], seed=11)


def _inject(rank: int, fail_ranks: tuple[int, ...], before_forward: bool = False) -> None:
    """In a rank process: the step with POISON's 37 rows raises on `fail_ranks`."""
    original = ModelRunner.target

    def target(self: ModelRunner, input_ids, layout, graphed=False):  # type: ignore[no-untyped-def]
        # POISON's step (on an idle group too), not a stand-in for it: rows of dummies on the reserved page 0 only
        stand_in = layout.row_pos.numel() > 0 and not bool(layout.page_table.any())
        poisoned = sum(layout.dp_sizes) == len(POISON) and rank in fail_ranks and not stand_in
        if poisoned and before_forward:
            raise RuntimeError(f"injected failure on rank {rank}, before the step's collectives")
        out = original(self, input_ids, layout, graphed)
        if poisoned:
            raise RuntimeError(f"injected failure on rank {rank}")
        return out

    ModelRunner.target = target  # type: ignore[method-assign]


def _job(model: str, dp: int) -> Job:
    poison = OfflineRequest(POISON, GREEDY, dp_rank=0, arrive_at_step=0)
    later = [OfflineRequest(p, GREEDY, dp_rank=i % dp, arrive_at_step=1) for i, p in enumerate(PROMPTS)]
    return Job({"model_path": model, "page_size": 4}, [poison] + later)


@pytest.mark.parametrize("tp,dp", [(2, 1), (2, 2)])
def test_step_failing_on_every_rank_ends_its_requests_and_ranks_go_on(tiny_ds: str, tp: int, dp: int) -> None:
    args = ServerArgs(tp=tp, dp=dp, enable_dp_attention=dp > 1, max_total_tokens=2048, dist_timeout=60)
    [got] = run_jobs(args, [_job(tiny_ds, dp)], setup=functools.partial(_inject, fail_ranks=tuple(range(tp))))
    expected = [c.token_ids for c in LLM(tiny_ds, page_size=4, max_total_tokens=2048).generate(PROMPTS, GREEDY)]
    assert got[0] == [], "the poisoned request should have ended with an error, without tokens"
    assert got[1:] == expected


@pytest.mark.parametrize("spec", [0, 2])
def test_step_failing_in_one_dp_group_before_shared_collectives_ends_its_requests(tiny_ds: str, spec: int) -> None:
    """DP attention, two groups of one rank: group 0's step raises before its forward while group 1 (no rows
    of its own) waits in the MLP's gather for group 0's rows. Group 0 stands in with dummy rows, its request
    ends with an error, and both groups go on: the later prompts give the single-device tokens (spec 2: MTP,
    whose draft steps the stand-in's dummies join too; spec 0: the overlapped scheduler's path)."""
    args = ServerArgs(tp=2, dp=2, enable_dp_attention=True, max_total_tokens=2048, dist_timeout=60,
                      speculative_algorithm="NEXTN" if spec else None, speculative_num_steps=spec or None)
    [got] = run_jobs(args, [_job(tiny_ds, 2)], timeout_s=120,
                     setup=functools.partial(_inject, fail_ranks=(0,), before_forward=True))
    expected = [c.token_ids for c in LLM(tiny_ds, page_size=4, max_total_tokens=2048).generate(PROMPTS, GREEDY)]
    assert got[0] == [], "the poisoned request should have ended with an error, without tokens"
    assert got[1:] == expected


@pytest.mark.parametrize("before_forward", [False, True])
def test_step_failing_on_one_rank_stops_every_rank(tiny_ds: str, before_forward: bool) -> None:
    """After the step's collectives, the next exchange finds the disagreement; before them, rank 0's
    collective gives up after --dist-timeout (2 s): either way the job ends with an error instead of
    hanging (run_jobs would raise TimeoutError after 60 s, which pytest.raises(RuntimeError) rejects)."""
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=2)
    with pytest.raises(RuntimeError, match="failed") as err:
        run_jobs(args, [_job(tiny_ds, 1)], timeout_s=60,
                 setup=functools.partial(_inject, fail_ranks=(1,), before_forward=before_forward))
    if before_forward:  # rank 1 raised before its collectives: rank 0's wait for it is what timed out
        assert "rank 0 failed" in str(err.value) or "StepFailedOnSomeRanks" in str(err.value), str(err.value)
    else:
        assert "StepFailedOnSomeRanks" in str(err.value) and "failed on rank(s) [1] only" in str(err.value)
