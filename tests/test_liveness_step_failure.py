"""A batch that raises on every rank ends that step's requests with an error and the ranks go on
(TP and DP attention), as does one that raises in one DP group before the collectives the groups share;
a batch that raises on one rank only stops every rank, promptly, with a message naming it; a rank that dies
without a word fails the run at once; ranks see the environment of their launch. The failure is injected into the
real ModelRunner of each rank process."""
from __future__ import annotations

import dataclasses
import functools
import os

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.model_runner import ModelRunner
from dsaserve.parallel.launch import Job, OfflineRequest, run_jobs
from dsaserve.server_args import ServerArgs

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = prompts_ids(4, [5, 30, 12, 21], seed=11)
# A poison prompt's step is the only one with its row count (it runs alone, first): 37 rows fail on the ranks
# `fail_ranks` names after the forward, 41 and 45 on DP group 0's rank before it (the DP test's other jobs).
POISON = {n: prompts_ids(1, [n], seed=5)[0] for n in (37, 41, 45)}


def _inject(rank: int, fail_ranks: tuple[int, ...], before_forward: bool = False) -> None:
    """In a rank process: the step of 37 poison rows raises on `fail_ranks` (before its forward if
    `before_forward`); the steps of 41 and 45 raise on rank 0 before their forward."""
    original = ModelRunner.target

    def target(self: ModelRunner, input_ids, layout, graphed=False):  # type: ignore[no-untyped-def]
        # a poison step (on an idle group too), not a stand-in for it: rows of dummies on the reserved page 0 only
        stand_in = layout.row_pos.numel() > 0 and not bool(layout.page_table.any())
        rows = sum(layout.dp_sizes) if not stand_in else 0
        early = (rows == 37 and before_forward) or rows in (41, 45)
        poisoned = (rows == 37 and rank in fail_ranks) or (rows in (41, 45) and rank == 0)
        if poisoned and early:
            raise RuntimeError(f"injected failure on rank {rank}, before the step's collectives")
        out = original(self, input_ids, layout, graphed)
        if poisoned:
            raise RuntimeError(f"injected failure on rank {rank}")
        return out

    ModelRunner.target = target  # type: ignore[method-assign]


def _job(model: str, dp: int, poison: int = 37, **overrides: object) -> Job:
    first = OfflineRequest(POISON[poison], GREEDY, dp_rank=0, arrive_at_step=0)
    later = [OfflineRequest(p, GREEDY, dp_rank=i % dp, arrive_at_step=1) for i, p in enumerate(PROMPTS)]
    return Job({"model_path": model, "page_size": 4, **overrides}, [first] + later)


def _single_device(model: str) -> list[list[int]]:
    return [c.token_ids for c in LLM(model, page_size=4, max_total_tokens=2048).generate(PROMPTS, GREEDY)]


def test_step_failing_on_every_rank_ends_its_requests_and_ranks_go_on(tiny_ds: str) -> None:
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=60)
    [got] = run_jobs(args, [_job(tiny_ds, 1)], setup=functools.partial(_inject, fail_ranks=(0, 1)))
    assert got[0] == [], "the poisoned request should have ended with an error, without tokens"
    assert got[1:] == _single_device(tiny_ds)


def test_dp_attention_step_failures_end_their_requests_and_ranks_go_on(tiny_ds: str) -> None:
    """TP 2 + DP 2 (two groups of one rank), three jobs on the same ranks. 37 rows: the step raises on every
    rank after its forward. 41 rows, and 45 with MTP: group 0's step raises before its forward while group 1
    (no rows of its own) waits in the MLP's gather for group 0's rows; group 0 stands in with dummy rows (for
    MTP's draft steps too; without MTP through the overlapped scheduler's path). Each poisoned request ends
    with an error and the ranks go on: the later prompts give the single-device tokens. Without the stand-in
    the second job's gather times out after --dist-timeout and every rank stops."""
    args = ServerArgs(tp=2, dp=2, enable_dp_attention=True, max_total_tokens=2048, dist_timeout=60)
    jobs = [_job(tiny_ds, 2, 37), _job(tiny_ds, 2, 41),
            _job(tiny_ds, 2, 45, speculative_algorithm="NEXTN", speculative_num_steps=2)]
    results = run_jobs(args, jobs, timeout_s=180, setup=functools.partial(_inject, fail_ranks=(0, 1)))
    expected = _single_device(tiny_ds)
    for job, got in zip(jobs, results):
        assert got[0] == [], f"the poisoned request of {len(job.requests[0].prompt_ids)} tokens should have failed"
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


def _exit_in(rank: int, dying: int) -> None:
    if rank == dying:
        os._exit(3)


def test_a_rank_dying_without_a_word_fails_the_run_at_once(tiny_ds: str) -> None:
    """A rank process that dies before it can report (os._exit in its setup: no traceback reaches the queue) fails
    run_jobs with its rank and exit code at once, not after the result timeout (300 s, this file's test timeout);
    the other rank, waiting for it at the rendezvous, is killed rather than left to the dist timeout."""
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=60)
    with pytest.raises(RuntimeError, match=r"rank 1 exited \(code 3\) and no result"):
        run_jobs(args, [_job(tiny_ds, 1)], setup=functools.partial(_exit_in, dying=1))


def _expect_env(rank: int, value: str) -> None:
    seen = os.environ.get("DSASERVE_TEST_LAUNCH_ENV")
    if seen != value:
        raise RuntimeError(f"rank {rank} sees DSASERVE_TEST_LAUNCH_ENV={seen!r}, the caller set {value!r}")


def test_ranks_see_the_callers_environment_of_each_launch(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_jobs' ranks fork from one long-lived forkserver; each launch still hands them the caller's environment
    as it is at that launch (fault-injection variables, DSASERVE_CHECKS)."""
    args = ServerArgs(tp=2, max_total_tokens=2048)
    for value in ("a", "b"):
        monkeypatch.setenv("DSASERVE_TEST_LAUNCH_ENV", value)
        job = Job({"model_path": tiny_ds, "page_size": 4}, [OfflineRequest(PROMPTS[0], GREEDY)])
        [got] = run_jobs(args, [job], setup=functools.partial(_expect_env, value=value))
        assert got == _single_device(tiny_ds)[:1]


def _fail_group0_chunk(rank: int) -> None:
    """In a rank process: DP group 0's step of a 16-row prompt chunk raises on rank 0 before its forward."""
    original = ModelRunner.target

    def target(self: ModelRunner, input_ids, layout, graphed=False):  # type: ignore[no-untyped-def]
        stand_in = layout.row_pos.numel() > 0 and not bool(layout.page_table.any())
        if rank == 0 and not stand_in and layout.dp_sizes[0] == 16:
            raise RuntimeError("injected failure in DP group 0, before the step's collectives")
        return original(self, input_ids, layout, graphed)

    ModelRunner.target = target  # type: ignore[method-assign]


def test_mtp_stand_in_for_a_chunk_that_drafts_nothing(tiny_ds: str) -> None:
    """MTP + DP attention: group 0's failed step was a prompt chunk that is not the prompt's last (it announced no
    drafting request) while group 1 drafts. Its stand-in made a dummy that drafted anyway, one draft row where
    the step's shape said none, and raised: every rank stopped. Now the poisoned request ends with an error and
    the other group's request gives the single-device tokens."""
    other, poison = prompts_ids(1, [6], seed=11)[0], prompts_ids(1, [40], seed=5)[0]  # poison: chunks of 16
    args = ServerArgs(tp=2, dp=2, enable_dp_attention=True, max_total_tokens=2048, dist_timeout=30)
    job = Job({"model_path": tiny_ds, "page_size": 4, "chunked_prefill_size": 32,  # 16 per DP group
               "speculative_algorithm": "NEXTN", "speculative_num_steps": 2},
              [OfflineRequest(other, GREEDY, dp_rank=1, arrive_at_step=0),
               OfflineRequest(poison, GREEDY, dp_rank=0, arrive_at_step=2)])
    [got] = run_jobs(args, [job], timeout_s=180, setup=_fail_group0_chunk)
    assert got[1] == [], "the poisoned request should have ended with an error"
    assert got[0] == LLM(tiny_ds, page_size=4, max_total_tokens=2048).generate([other], GREEDY)[0].token_ids


@pytest.mark.parametrize("overlap", [True, False])
def test_a_request_whose_tokens_cannot_be_committed_ends_alone(tiny_ds: str, overlap: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Committing one request's tokens raises (its stop rules, injected into the engine's real ones): that request
    ends with the error and the others in its steps run on to the single-device tokens. The whole step used to
    fail (without overlap), or the exception left the engine's step altogether (with it)."""
    from dsaserve.engine import request as request_module
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=2048, disable_overlap_schedule=not overlap)
    want = _single_device(tiny_ds)
    real = request_module.stop_reason

    def stop_reason(req, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "never seen" in req.params.stop:
            raise RuntimeError("injected decode failure")
        return real(req, *args, **kwargs)
    monkeypatch.setattr(request_module, "stop_reason", stop_reason)
    stopping = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=("never seen",))
    out = llm.generate(PROMPTS + [PROMPTS[0]], [GREEDY] * len(PROMPTS) + [stopping])
    assert [c.token_ids for c in out[:-1]] == want
    assert out[-1].finish_reason.kind == "error" and "injected decode failure" in out[-1].finish_reason.message
    engine = llm.engine  # its usage counts only the tokens its client got (none here: its first commit failed)
    engine.add_request("alone", PROMPTS[1], stopping)
    outputs = [o for o in engine.run_until_idle() + engine.take_finished() if o.rid == "alone"]
    assert outputs[-1].finish.kind == "error"
    assert outputs[-1].completion_tokens == sum(len(o.new_token_ids) for o in outputs) == 0
    assert engine.stats().free_pages == engine.stats().total_pages


def _inject_sampling_failure(rank: int) -> None:
    """In the leader's process: sampling a batch that holds the 37-token poison prompt raises (after the step's
    forward, whose collectives every rank completed; the other ranks never sample), overlapped or not."""
    from dsaserve.engine import engine, overlap
    real_tokens, real_accept = overlap.sample_tokens, engine.launch_accept

    def poisoned(reqs) -> None:  # type: ignore[no-untyped-def]
        if any(len(r.prompt_ids) == 37 for r in reqs):
            raise RuntimeError(f"injected sampling failure on rank {rank}")

    def sample_tokens(rows, reqs, pending):  # type: ignore[no-untyped-def]
        poisoned(reqs)
        return real_tokens(rows, reqs, pending)

    def accept(requests, plan, real, logits):  # type: ignore[no-untyped-def]
        poisoned([requests[rid] for rid in plan.rids[:real]])
        return real_accept(requests, plan, real, logits)
    overlap.sample_tokens, engine.launch_accept = sample_tokens, accept


@pytest.mark.parametrize("mode", ["overlap", "plain", "mtp"])
def test_sampling_failing_on_the_leader_ends_its_requests_and_ranks_go_on(tiny_ds: str, mode: str) -> None:
    """Sampling is the leader's alone: its failure ends that step's requests and the ranks, which all finished the
    step's forward, go on to the single-device tokens (with MTP the leader joins the draft steps' collectives on
    dummy rows). The leader used to report the failure in the next exchange as its own, and every rank stopped
    (StepFailedOnSomeRanks). (Without overlap: as a PD server runs; MTP runs without it.)"""
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=60)
    flags = {"plain": dict(disable_overlap_schedule=True),
             "mtp": dict(speculative_algorithm="NEXTN", speculative_num_steps=2)}.get(mode, {})
    job = _job(tiny_ds, 1, **flags)
    [got] = run_jobs(args, [job], timeout_s=120, setup=_inject_sampling_failure)
    assert got[0] == [], "the poisoned request should have ended with an error, without tokens"
    assert got[1:] == _single_device(tiny_ds)


def test_partial_dp_step_failing_on_every_rank_ends_its_requests(tiny_ds: str) -> None:
    """--tp 4 --dp 2 (two attention groups of two ranks): the 37-row step raises on every rank after its forward,
    where group 0 split its rows over its ranks (the indexer's and the attention's group-local collectives) and
    group 1, with no rows, did not. The groups agree on the collectives they share, which is what they must:
    the poisoned request ends with an error and the ranks go on (comparing all their collectives, every rank
    stopped)."""
    args = ServerArgs(tp=4, dp=2, enable_dp_attention=True, max_total_tokens=2048, dist_timeout=60)
    [got] = run_jobs(args, [_job(tiny_ds, 2, 37)], timeout_s=180,
                     setup=functools.partial(_inject, fail_ranks=(0, 1, 2, 3)))
    assert got[0] == [], "the poisoned request should have ended with an error, without tokens"
    assert got[1:] == _single_device(tiny_ds)


def _inject_keep_drafts_failure(rank: int) -> None:
    """In the leader's process: keeping the drafts of a step that holds the 37-token poison prompt raises (after
    its commit and after every rank's draft steps; the leader's own host work)."""
    from dsaserve.engine import engine
    real = engine.drafts_in_flight

    def drafts_in_flight(requests, plan, real_rows, drafts):  # type: ignore[no-untyped-def]
        if any(len(requests[rid].prompt_ids) == 37 for rid in plan.rids[:real_rows] if rid in requests):
            raise RuntimeError(f"injected failure keeping the drafts on rank {rank}")
        return real(requests, plan, real_rows, drafts)
    engine.drafts_in_flight = drafts_in_flight


def test_mtp_leader_failing_after_the_commit_ends_its_requests_and_ranks_go_on(tiny_ds: str) -> None:
    """With MTP the leader's work after a step's commit (keeping the drafts; on a prefill server handing requests
    over) follows every rank's collectives of the step: its failure ends that step's requests and the ranks go
    on. It used to be reported as the leader's alone in the next exchange, and every rank stopped."""
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=60)
    job = _job(tiny_ds, 1, speculative_algorithm="NEXTN", speculative_num_steps=2)
    [got] = run_jobs(args, [job], timeout_s=120, setup=_inject_keep_drafts_failure)
    # its first token, committed before the failure, went out; then it ended with the error, short of max_tokens
    assert len(got[0]) < GREEDY.max_tokens, "the poisoned request should have ended with an error"
    assert got[1:] == _single_device(tiny_ds)


def _inject_draft_read_failure(rank: int) -> None:
    """In the leader's process: reading the drafts of the 37-token poison prompt (in the step that verifies them,
    after every rank's forward of it) raises."""
    from dsaserve.engine import engine
    real = engine.settle_drafts

    def settle_drafts(requests, drafts, override=None):  # type: ignore[no-untyped-def]
        if any(r is not None and len(r.prompt_ids) == 37 for r in drafts.requests):
            def read() -> list[int]:
                raise RuntimeError(f"injected failure reading the drafts on rank {rank}")
            drafts.read = read
        return real(requests, drafts, override)
    engine.settle_drafts = settle_drafts


def test_mtp_drafts_that_cannot_be_read_end_their_step_and_ranks_go_on(tiny_ds: str) -> None:
    """The leader reads a step's drafts in the next step, after that step's forward: a failure there is its own.
    It escaped the step before the draft steps' collectives, which the other rank then waited in until its
    timeout (CollectiveFailed: the run died). Now the step's requests end with the error and the ranks go on. (The
    others arrive after that step: the poison prompt's prefill drafts, the next step verifies.)"""
    args = ServerArgs(tp=2, max_total_tokens=2048, dist_timeout=60)
    job = _job(tiny_ds, 1, speculative_algorithm="NEXTN", speculative_num_steps=2)
    job = Job(job.overrides, job.requests[:1] + [dataclasses.replace(r, arrive_at_step=3) for r in job.requests[1:]])
    [got] = run_jobs(args, [job], timeout_s=120, setup=_inject_draft_read_failure)
    assert len(got[0]) < GREEDY.max_tokens, "the poisoned request should have ended with an error"
    assert got[1:] == _single_device(tiny_ds)
