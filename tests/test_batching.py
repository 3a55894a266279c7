"""Batch invariance: greedy outputs are the same alone or batched, for any chunk and page size."""
from __future__ import annotations

import logging

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.warmup import warmup_lengths
from dsaserve.ops.fp8 import gemm_tier

LENGTHS = [3, 40, 9, 17, 1, 26, 12, 33]  # below and above index_topk (16)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_ds: str) -> list[list[int]]:
    llm = LLM(tiny_ds, page_size=64, chunked_prefill_size=64, max_total_tokens=4096)
    return [llm.generate([ids], GREEDY)[0].token_ids for ids in prompts_ids(8, LENGTHS, seed=3)]


@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_batched_equals_alone(tiny_ds: str, alone: list[list[int]], page_size: int, chunk: int) -> None:
    llm = LLM(tiny_ds, page_size=page_size, chunked_prefill_size=chunk, max_total_tokens=4096)
    together = [c.token_ids for c in llm.generate(prompts_ids(8, LENGTHS, seed=3), GREEDY)]
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a == t, f"prompt {i} ({LENGTHS[i]} tokens) differs when batched (page {page_size}, chunk {chunk})"
    stats = llm.engine.stats()
    assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0


def test_seeded_sampling_is_batch_independent(tiny_ds: str) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=4096)
    prompts = prompts_ids(4, [6, 20, 11, 2], seed=4)
    single = llm.generate([prompts[2]], params)[0].token_ids
    batched = llm.generate(prompts, [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
                                     for s in (1, 2)] + [params, SamplingParams(max_tokens=5, ignore_eos=True)])
    assert batched[2].token_ids == single
    other_seed = llm.generate([prompts[2]], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=99,
                                                           ignore_eos=True))[0].token_ids
    assert other_seed != single  # the seed matters (12 tokens from a near-uniform tiny model)


@pytest.mark.parametrize("steps", [0, 3])
def test_decode_rows_progress_during_a_chunked_prefill(tiny_ds: str, steps: int) -> None:
    """Mixed chunks: while a long prompt prefills in chunks of 8, a running request gains tokens in the
    same steps; the tokens equal a run where a step either prefills or decodes."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    short, long = prompts_ids(2, [5, 40], seed=9)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(tiny_ds, page_size=4, chunked_prefill_size=8, max_total_tokens=4096,
                                         enable_mixed_chunk=False, **spec).generate([short, long], params)]
    llm = LLM(tiny_ds, page_size=4, chunked_prefill_size=8, max_total_tokens=4096, **spec)
    engine = llm.engine
    engine.add_request("short", short, params)
    tokens = {"short": [], "long": []}
    for out in engine.step():  # the short prompt's prefill: its first token
        tokens[out.rid] += out.new_token_ids
    engine.add_request("long", long, params)
    mixed_steps = 0
    while engine.has_work():
        decoded = len(tokens["short"])
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
        prefilling = "long" in engine.requests and engine.requests["long"].num_cached < len(long)
        mixed_steps += prefilling and len(tokens["short"]) > decoded  # decoded while the other prefilled
    assert [tokens["short"], tokens["long"]] == expected
    assert mixed_steps >= 3  # 40 prompt tokens in chunks of 8 (minus the decode rows): several mixed steps


@pytest.mark.parametrize("steps", [0, 2])
def test_a_prompt_starts_while_decode_rows_fill_the_budget(tiny_ds: str, steps: int) -> None:
    """Mixed chunks with more decode rows than --chunked-prefill-size: a prompt that arrives while four
    requests decode gets its first token long before any of them finishes (it used to wait for one to end);
    every request's tokens equal a run where a step either prefills or decodes."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    early, late = prompts_ids(4, [3, 5, 2, 4], seed=11), prompts_ids(1, [9], seed=12)[0]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    common = dict(page_size=4, chunked_prefill_size=4, max_total_tokens=4096, **spec)
    expected = [o.token_ids for o in LLM(tiny_ds, enable_mixed_chunk=False, **common).generate(early + [late], params)]
    engine = LLM(tiny_ds, **common).engine
    tokens: dict[str, list[int]] = {f"e{i}": [] for i in range(4)} | {"late": []}
    for i, ids in enumerate(early):
        engine.add_request(f"e{i}", ids, params)
    for _ in range(50):  # until every early request decodes
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
        if all(tokens[f"e{i}"] for i in range(4)):
            break
    engine.add_request("late", late, params)
    late_started_while_all_decode = None
    while engine.has_work():
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
        if late_started_while_all_decode is None and tokens["late"]:
            late_started_while_all_decode = all(len(tokens[f"e{i}"]) < params.max_tokens for i in range(4))
    assert late_started_while_all_decode, "the late prompt waited for a decoder to finish"
    assert [tokens[f"e{i}"] for i in range(4)] + [tokens["late"]] == expected


def test_gpu_warm_up_prompts_reach_every_fp8_gemm_tier() -> None:
    """Eager steps of any row count (mixed steps, decode batches past the graph sizes) run the FP8 GEMM in the
    tile family of their rows (ops/fp8.gemm_tier, which fp8_gemm.default_config dispatches on): the GPU warm-up
    has a prompt in each, at the default chunk size and at a small one, so no tile compiles after ready (65-95
    rows had none: three compilations after ready on an H100, docs/benchmarks.md)."""
    for chunk in (8192, 1088, 128):
        lengths = warmup_lengths(on_gpu=True, chunk=chunk, longest=100_000)
        assert {gemm_tier(n) for n in lengths} == {gemm_tier(rows) for rows in range(1, chunk + 1)}, chunk


@pytest.mark.parametrize("spec_steps", [0, 2])
def test_warm_up_leaves_a_fresh_engine(tiny_ds: str, spec_steps: int, caplog: pytest.LogCaptureFixture) -> None:
    """The start-up warm-up runs its prompts through the whole engine (logged), then the engine is as new:
    no requests, every page free, an empty prefix cache, counters at zero; outputs equal an engine's that
    skipped it (`--skip-server-warmup`)."""
    common = dict(page_size=4, max_total_tokens=4096, cuda_graph_max_bs=4)
    if spec_steps:
        common |= dict(speculative_algorithm="NEXTN", speculative_num_steps=spec_steps)
    with caplog.at_level(logging.INFO, logger="dsaserve.engine.warmup"):
        warm = LLM(tiny_ds, **common)
    assert "warm-up: prompts of [17, 32] tokens" in caplog.text
    s = warm.engine.stats()
    assert s.steps == s.spec_verify_steps == s.prefix_queried_tokens == s.cached_pages == 0
    assert s.free_pages == s.total_pages and not warm.engine.requests and not warm.engine.has_work()
    cold = LLM(tiny_ds, skip_server_warmup=True, **common)
    prompts = prompts_ids(4, [17, 5, 32, 9], seed=12)
    assert [c.token_ids for c in warm.generate(prompts, GREEDY)] == [c.token_ids for c in cold.generate(prompts, GREEDY)]
    assert cold.engine.stats().steps == warm.engine.stats().steps  # the warm engine's count started at zero
