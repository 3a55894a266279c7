"""TP, DP attention and partial DP attention, with and without MTP speculative decoding and padded
static (CUDA-graph) layouts: greedy tokens identical to the single-device, non-speculative run.

Real rank processes over gloo (CPU), checked mode on (layouts validated, the replicated indexer's
top-k compared across the attention-TP ranks every layer).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from conftest import ARCHS, gloo_ranks, prompts_ids, sampling_features
from dsaserve import LLM, SamplingParams
from dsaserve.parallel.launch import Job, OfflineRequest, init_distributed, run_jobs
from dsaserve.server_args import ServerArgs
from dsaserve.tiny import make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = prompts_ids(4, [5, 30, 12, 21], seed=11)  # below and above index_topk (16)


def single_device(model: str, page_size: int, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return [list(t) for t in _single_device(model, page_size, tuple(map(tuple, prompts)))]


@functools.lru_cache(maxsize=None)
def _single_device(model: str, page_size: int, prompts: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """The reference run, once per model, page size and prompts (the cases share it)."""
    llm = LLM(model, page_size=page_size, max_total_tokens=2048)
    return tuple(tuple(c.token_ids) for c in llm.generate([list(p) for p in prompts], GREEDY))


def spec(steps: int, graphs: int | None = None) -> dict[str, object]:
    return dict(speculative_algorithm="NEXTN", speculative_num_steps=steps, cuda_graph_max_bs=graphs)


def _jobs(models: dict[str, str], dp: int, steps: int) -> list[tuple[str, int, Job]]:
    """Both archs: page sizes 1 and 64 without speculation; speculation with S = `steps` at page size 64,
    and S = 3 with graph buckets of 2 at page size 1 (the reported deployment's flags)."""
    jobs = []
    for arch in ARCHS:
        for page_size, extra in ((1, {}), (64, {}), (64, spec(steps)), (1, spec(3, graphs=2))):
            reqs = [OfflineRequest(p, GREEDY, dp_rank=i % dp) for i, p in enumerate(PROMPTS)]
            overrides = {"model_path": models[arch], "page_size": page_size, **extra}
            jobs.append((models[arch], page_size, Job(overrides, reqs)))
    return jobs


@pytest.mark.parametrize("tp,dp,steps,ep", [(2, 1, 1, 1), (4, 1, 2, 1), (2, 2, 3, 2), (4, 2, 1, 1), (4, 4, 2, 2)])
def test_parallel_matches_single_device(tp: int, dp: int, steps: int, ep: int, tiny_models: dict[str, str],
                                        tiny_ds: str, head_models: dict[int, str]) -> None:
    """Both archs in four configurations each; the --tp 2 launch also serves 1, 8 and 16 heads per rank and
    the --tp 4 --dp 2 launch the uneven DP timings (one launch each: rank processes cost seconds to start).
    Expert parallelism: --tp 2 --dp 2 --ep 2 (whole experts: SGLang's DeepSeek-V3.2 line at two ranks) and
    --tp 4 --dp 4 --ep 2 (two ranks per expert)."""
    jobs = [j for _, _, j in _jobs(tiny_models, dp, steps)]
    extra, check_extra = {(2, 1): _heads_per_rank, (4, 2): _uneven_timing}.get((tp, dp), _nothing)(
        tiny_ds, head_models)
    args = ServerArgs(tp=tp, dp=dp, ep=ep, enable_dp_attention=dp > 1, max_total_tokens=2048)
    results = run_jobs(args, jobs + extra)
    for (model, page_size, job), got in zip(_jobs(tiny_models, dp, steps), results):
        assert got == single_device(model, page_size), f"tp={tp} dp={dp} ep={ep} {job.overrides}"
    check_extra(results[len(jobs):])


Check = Callable[[list], None]


def _nothing(tiny_ds: str, head_models: dict[int, str]) -> tuple[list[Job], Check]:
    return [], lambda results: None


@pytest.fixture(scope="module")
def head_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("heads")
    return {h: str(make_tiny_model(Path(root) / f"h{h}", "deepseek_v32", num_attention_heads=h, num_key_value_heads=h))
            for h in (2, 16, 32)}


def _heads_per_rank(tiny_ds: str, head_models: dict[int, str]) -> tuple[list[Job], Check]:
    """At --tp 2: 1, 8 and 16 heads per rank."""
    jobs = [Job({"model_path": m, "page_size": 64}, [OfflineRequest(p, GREEDY) for p in PROMPTS[:2]])
            for m in head_models.values()]

    def check(results: list) -> None:
        for model, got in zip(head_models.values(), results):
            assert got == single_device(model, 64, PROMPTS[:2]), model
    return jobs, check


def _uneven_timing(tiny_ds: str, head_models: dict[int, str]) -> tuple[list[Job], Check]:
    """DP rank 0 idle while rank 1 decodes; a request arriving on rank 0 mid-decode of rank 1 (its
    prefill runs beside the other's decode); 1 vs 3 and 0 vs 4 requests per rank, also with speculation
    and graph buckets (an idle group replays the agreed bucket with dummy requests); unseeded sampling
    differs between DP groups (each group draws its own seeds); a prompt repeated on one group after
    the first one ended, and on the other group (each with its own prefix cache), gives the same tokens; seeded
    top-p sampling, penalties, a JSON-schema grammar (greedy and sampled) and a stop string on both groups, with
    and without MTP, give the single-device tokens (the sampling state lives on each group's leader)."""
    late = [OfflineRequest(PROMPTS[0], GREEDY, dp_rank=0, arrive_at_step=6)]
    busy = [OfflineRequest(p, GREEDY, dp_rank=1) for p in PROMPTS[1:]]
    early = [OfflineRequest(PROMPTS[3], GREEDY, dp_rank=0, arrive_at_step=0),
             OfflineRequest(PROMPTS[1], GREEDY, dp_rank=1, arrive_at_step=3)]
    all_on_one = [OfflineRequest(p, GREEDY, dp_rank=1) for p in PROMPTS]
    repeats = [OfflineRequest(PROMPTS[1], GREEDY, dp_rank=r, arrive_at_step=s) for r, s in ((0, 0), (0, 9), (1, 9))]
    unseeded = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    same_prompt = [OfflineRequest(PROMPTS[1], unseeded, dp_rank=r) for r in (0, 1)]
    jobs = [Job({"model_path": tiny_ds, "page_size": 1}, late + busy),
            Job({"model_path": tiny_ds, "page_size": 64}, early),
            Job({"model_path": tiny_ds, "page_size": 1, **spec(3, graphs=2)}, late + busy),
            Job({"model_path": tiny_ds, "page_size": 1, **spec(2, graphs=4)}, all_on_one),
            Job({"model_path": tiny_ds, "page_size": 64}, same_prompt),
            Job({"model_path": tiny_ds, "page_size": 1, **spec(3, graphs=2)}, repeats)]  # 2nd: after the 1st ended
    features = sampling_features(tiny_ds, PROMPTS[:3])
    jobs += [Job({"model_path": tiny_ds, "page_size": 1, **extra},
                 [OfflineRequest(p, k, dp_rank=i % 2) for i, (p, k) in enumerate(features)])
             for extra in ({}, spec(2, graphs=2))]
    return jobs, lambda results: _check_uneven(tiny_ds, features, results)


def _check_uneven(tiny_ds: str, features: list, results: list) -> None:
    assert results[0] == results[2] == single_device(tiny_ds, 1, PROMPTS[:1] + PROMPTS[1:])
    assert results[1] == single_device(tiny_ds, 64, [PROMPTS[3], PROMPTS[1]])
    assert results[3] == single_device(tiny_ds, 1)
    assert results[4][0] != results[4][1], "unseeded requests on two DP groups drew the same seed"
    assert results[5] == single_device(tiny_ds, 1, [PROMPTS[1]]) * 3
    alone = LLM(tiny_ds, page_size=1, max_total_tokens=2048).generate([p for p, _ in features],
                                                                      [k for _, k in features])
    assert alone[-3].finish_reason.kind == "stop"  # the stop string ends the first prompt's output
    assert results[6] == results[7] == [list(c.token_ids) for c in alone]



@pytest.mark.parametrize("tp", [2, 3, 4, 8])
def test_a_prefill_splits_the_indexer_rows_over_the_attention_group(tp: int) -> None:
    """indexer.prefill_row_share: extend and mixed steps of at least INDEXER_SPLIT_ROWS rows per rank give every rank
    every attn_tp-th row from its rank (causal rows load the ranks evenly), together each row once, in the
    order all_gather_attn_rows interleaves them back; decode, verify and shorter steps score every row on every
    rank. The equality tests above take the split: their first prefill step has 68 rows (51 in one DP group
    of the --tp 4 --dp 2 launch)."""
    from types import SimpleNamespace

    from dsaserve.engine.layout import StepMode
    from dsaserve.model.indexer import INDEXER_SPLIT_ROWS, prefill_row_share
    from dsaserve.parallel.groups import Parallel, ParallelConfig

    def share(rank: int, rows: int, mode: StepMode) -> slice | None:
        par = Parallel.without_groups(ParallelConfig(tp=tp, rank=rank))
        return prefill_row_share(SimpleNamespace(par=par, layout=SimpleNamespace(mode=mode)), rows)

    least = INDEXER_SPLIT_ROWS * tp
    for rows in (least, least + 1, least + tp - 1, 3 * least + 7, 8192 + 3):
        for mode in (StepMode.EXTEND, StepMode.MIXED):
            shares = [range(rows)[share(r, rows, mode)] for r in range(tp)]
            assert all(len(s) >= INDEXER_SPLIT_ROWS for s in shares)
            interleaved = [s[j] for j in range(len(shares[0])) for s in shares if j < len(s)]
            assert interleaved == list(range(rows))  # row j * tp + r is rank r's j-th
        assert share(0, rows, StepMode.DECODE) is None and share(0, rows, StepMode.VERIFY) is None
    assert share(0, least - 1, StepMode.EXTEND) is None
    assert tp != 2 or share(1, 68, StepMode.EXTEND) == slice(1, 68, 2)


def _exchanges(rank: int, addr: str, tp: int, out: Any) -> None:  # (conftest.gloo_ranks)
    """One of `tp` gloo ranks: its heads of every row to its rows of every head and back (MLAttention._attend)."""
    par = init_distributed(ServerArgs(tp=tp, device="cpu"), rank, addr)
    try:
        results = []
        for rows, dtype in ((1, torch.float32), (tp, torch.bfloat16), (2 * tp + 1, torch.float32), (37, torch.float32)):
            group = torch.arange(rows * 3 * tp * 2).view(rows, 3 * tp, 2).to(dtype)  # every rank's 3 heads
            mine = group[:, rank * 3:(rank + 1) * 3]
            q_rows = par.attn_heads_to_rows(mine)
            back = par.attn_rows_to_heads(q_rows * 2, rows)  # (an "attention" each row's heads go through)
            results.append((torch.equal(q_rows, group[par.attn_row_share(rows)]), torch.equal(back, mine * 2)))
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 3])
def test_the_attention_row_exchange_turns_the_head_split_into_the_row_split(tp: int) -> None:
    """Parallel.attn_heads_to_rows on real gloo ranks: each rank gets its attn_row_share of the rows with every
    rank's heads in rank order (row counts below, at and not a multiple of tp); attn_rows_to_heads sends each
    rank's heads of every row back."""
    got = gloo_ranks(_exchanges, tp, tp)
    assert all(all(ok for pair in got[r] for ok in pair) for r in range(tp)), got


def test_a_prefill_splits_the_attention_rows_only_for_narrow_heads() -> None:
    """MLAttention._row_share: the indexer's row split (above) where a rank holds fewer than ROW_SPLIT_HEADS
    heads (the equality tests above take it: the tiny models hold fewer), never from ROW_SPLIT_HEADS heads or in
    deterministic mode."""
    from types import SimpleNamespace

    from dsaserve.engine.layout import StepMode
    from dsaserve.model.dsa import ROW_SPLIT_HEADS, MLAttention
    from dsaserve.parallel.groups import Parallel, ParallelConfig

    def share(heads: int, rows: int, mode: StepMode, invariant: bool = False) -> slice | None:
        ctx = SimpleNamespace(par=Parallel.without_groups(ParallelConfig(tp=4, rank=1)), layout=SimpleNamespace(
            mode=mode), ops=SimpleNamespace(batch_invariant=invariant))
        return MLAttention._row_share(SimpleNamespace(num_heads=heads), ctx, rows)

    assert share(16, 68, StepMode.EXTEND) == share(ROW_SPLIT_HEADS - 1, 68, StepMode.MIXED) == slice(1, 68, 4)
    assert share(ROW_SPLIT_HEADS, 68, StepMode.EXTEND) is None and share(16, 68, StepMode.EXTEND, True) is None
    assert share(16, 68, StepMode.DECODE) is None and share(16, 63, StepMode.EXTEND) is None


def test_the_row_split_without_checked_mode_matches_single_device(monkeypatch: pytest.MonkeyPatch,
                                                                  tiny_models: dict[str, str]) -> None:
    """The attention's row split as a deployment runs it, checked mode off (every other test here checks, which
    gathers the selection to validate it; off, no rank sees another's top-k): --tp 2, both archs. A first step of
    69 rows that each see at most index_topk keys (every rank's share of the all-keys selection, reused by the
    layers after; 69 rows: off a multiple of tp), and the usual prompts with MTP, also with GLM-5.2's index sharing
    (the draft steps attend the MTP pass's selection, gathered from the ranks' row shares): the single-device
    tokens."""
    monkeypatch.setenv("DSASERVE_CHECKS", "0")  # (inherited by the rank processes)
    short = prompts_ids(6, [15, 13, 11, 9, 14, 7], seed=12)  # each within the tiny models' index_topk (16)
    jobs = [Job({"model_path": tiny_models[arch], "page_size": 1}, [OfflineRequest(p, GREEDY) for p in short])
            for arch in ARCHS]
    shared = {"json_model_override_args": '{"index_share_for_mtp_iteration": true}'}
    spec_archs = [(arch, {}) for arch in ARCHS] + [("glm_moe_dsa", shared)]
    jobs += [Job({"model_path": tiny_models[arch], "page_size": 64, **spec(2), **extra},
                 [OfflineRequest(p, GREEDY) for p in PROMPTS]) for arch, extra in spec_archs]
    results = run_jobs(ServerArgs(tp=2, max_total_tokens=2048), jobs)
    for arch, got in zip(ARCHS, results):
        assert got == single_device(tiny_models[arch], 1, short), arch
    for (arch, extra), got in zip(spec_archs, results[len(ARCHS):]):
        assert got == single_device(tiny_models[arch], 64), (arch, extra)
