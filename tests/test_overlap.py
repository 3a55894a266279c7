"""Overlapped scheduling (engine/overlap.py): the next step is planned and launched before the previous
step's tokens are committed, and every output equals the engine's without overlap."""
from __future__ import annotations

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams

PROMPTS = prompts_ids(6, [3, 40, 9, 17, 26, 5], seed=7)


def _llm(path: str, **extra) -> LLM:
    # A small pool and chunks: retraction and chunked prefill happen while tokens are in flight.
    return LLM(path, page_size=4, max_total_tokens=120, chunked_prefill_size=16, **extra)


def _params(stop_token: int, stop_text: str) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0.7, frequency_penalty=0.5, seed=3, ignore_eos=True),
            SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_token], ignore_eos=True),
            SamplingParams(max_tokens=16, temperature=0.0, stop=stop_text, ignore_eos=True)]


def test_overlap_gives_the_tokens_of_the_plain_engine(tiny_ds: str) -> None:
    plain = _llm(tiny_ds, disable_overlap_schedule=True)
    probe = plain.generate(PROMPTS[4:6], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    stop_token = probe[0].token_ids[3]  # the 4th token of prompt 4 stops it early
    stop_text = plain.tokenizer.decode(probe[1].token_ids)[6:8]
    params = _params(stop_token, stop_text)
    expected = plain.generate(PROMPTS, params)
    overlapped = _llm(tiny_ds)
    assert overlapped.engine.overlap is not None and plain.engine.overlap is None
    got = overlapped.generate(PROMPTS, params)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason and g.text == e.text
        assert [t for t, _ in g.logprobs] == pytest.approx([t for t, _ in e.logprobs], abs=1e-4)
    assert got[4].finish_reason.kind == "stop" and len(got[4].token_ids) < 16  # a stop inside the run
    assert overlapped.engine.scheduler.num_retractions > 0  # the pool forced retractions
    stats = overlapped.engine.stats()
    assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0
    assert not overlapped.engine.has_work()


def test_next_step_launches_before_the_previous_tokens_are_committed(tiny_ds: str) -> None:
    """The forward of a step runs while a request of it still has an uncommitted (in-flight) token;
    without overlap never. Speculative engines do not overlap."""
    seen = {}
    for name, extra in (("overlap", {}), ("plain", {"disable_overlap_schedule": True})):
        llm = _llm(tiny_ds, **extra)
        engine, target = llm.engine, llm.engine.runner.target
        flags: list[bool] = []

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            flags.append(any(r.inflight for r in engine.requests.values()))
            return target(*args, **kwargs)

        engine.runner.target = spy
        llm.generate(PROMPTS[:3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        seen[name] = flags
    assert any(seen["overlap"]) and not any(seen["plain"])
    spec = LLM(tiny_ds, page_size=4, max_total_tokens=512, speculative_algorithm="NEXTN", speculative_num_steps=1)
    assert spec.engine.overlap is None


def test_abort_with_a_token_in_flight(tiny_ds: str) -> None:
    """An abort between a step's launch and its commit ends the request; its in-flight token is dropped,
    its pages return, and the other request's tokens are unchanged."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = _llm(tiny_ds, disable_overlap_schedule=True).generate(PROMPTS[1:2], greedy)[0].token_ids
    llm = _llm(tiny_ds)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], greedy)
    engine.add_request("b", PROMPTS[1], greedy)
    outputs = []
    while not engine.requests["a"].inflight:
        outputs += engine.step()
    assert engine.abort("a")
    outputs += engine.run_until_idle()
    ends = {o.rid: o.finish.kind for o in outputs if o.finished}
    assert ends == {"a": "abort", "b": "length"}
    assert [t for o in outputs if o.rid == "b" for t in o.new_token_ids] == expected
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages


def test_tokens_in_flight_are_waited_for_not_retracted(tiny_ds: str) -> None:
    """When the only work left is tokens in flight (each request's last, by length), the scheduler waits
    for their commit: in a pool with room nothing is retracted (it once sent every finishing request
    back to wait), and the outputs equal the engine without overlap."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    roomy = dict(page_size=4, max_total_tokens=2048)
    plain = LLM(tiny_ds, disable_overlap_schedule=True, **roomy).generate(PROMPTS, params)
    llm = LLM(tiny_ds, **roomy)
    assert llm.engine.overlap is not None
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in plain]
    stats = llm.engine.stats()
    assert stats.num_retractions == 0 and stats.running == stats.waiting == 0
    assert stats.free_pages == stats.total_pages
