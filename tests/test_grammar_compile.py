"""Grammars compile beside the step loop (engine/grammar_compile.py): running requests keep decoding while a
request's grammar compiles; the request joins the scheduler once it is ready and then decodes as if it had been
compiled at once; an abort or a failed compile ends that request alone. A gate (conftest.compile_gate) holds the
real compile until the test opens it, so what happens during a compile does not depend on how long one takes.
PD: tests/test_disagg_engine.py; the DP wake-up: tests/test_server_parallel.py."""
from __future__ import annotations

import json
import pytest

from conftest import CompileGate, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.chat.grammar import GrammarSpec, checked_spec, json_grammar

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}
PROMPT = prompts_ids(1, [9], seed=4)[0]


@pytest.fixture(scope="module")
def llm(tiny_ds: str) -> LLM:
    return LLM(tiny_ds, max_total_tokens=2048)


def _constrained(path: str) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=0.0, grammar=checked_spec(json_grammar(SCHEMA), path, (1,)))


def test_running_requests_decode_while_a_grammar_compiles(llm: LLM, tiny_ds: str,
                                                          compile_gate: CompileGate) -> None:
    engine = llm.engine
    compile_gate.set()
    expected = llm.generate(PROMPT, _constrained(tiny_ds))[0]  # alone, its grammar compiled at once
    compile_gate.clear()
    engine.add_request("plain", prompts_ids(1, [7], seed=5)[0], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("json", PROMPT, _constrained(tiny_ds))
    tokens: dict[str, list[int]] = {"plain": [], "json": []}
    for _ in range(50):
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
        if "plain" not in engine.requests:
            break
    assert len(tokens["plain"]) == 6 and "plain" not in engine.requests  # it ran to its end meanwhile
    assert tokens["json"] == [] and engine.stats().waiting == 1  # still waiting for its grammar, counted queued
    assert engine.has_work() and not engine.has_work(compiling=False)
    compile_gate.set()
    for out in engine.run_until_idle():
        tokens[out.rid] += out.new_token_ids
    assert tokens["json"] == expected.token_ids  # as if its grammar had compiled at once
    assert json.loads(expected.text).keys() == {"n", "ok"}
    assert engine.allocator.num_free + engine.prefix_cache.reclaimable() == engine.allocator.capacity


def test_an_abort_during_the_compile_ends_the_request(llm: LLM, tiny_ds: str, compile_gate: CompileGate) -> None:
    engine = llm.engine
    engine.add_request("json", PROMPT, _constrained(tiny_ds))
    assert engine.has_work() and engine.stats().waiting == 1
    assert engine.abort("json")
    (out,) = engine.take_finished()
    assert out.finish.kind == "abort" and not engine.has_work() and engine.grammars.held == []
    compile_gate.set()  # the compile ends unused
    assert engine.run_until_idle() == [] and "json" not in engine.requests


def test_a_failed_compile_ends_its_request_alone(llm: LLM, tiny_ds: str) -> None:
    """A grammar whose tokenizer cannot be loaded (a spec that skipped checked_spec): that request ends with the
    error; a request beside it completes."""
    engine = llm.engine
    broken = SamplingParams(max_tokens=4, grammar=GrammarSpec(json_grammar(SCHEMA), "/nonexistent/tokenizer", (1,)))
    engine.add_request("broken", PROMPT, broken)
    engine.add_request("plain", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    outs = {}
    for out in engine.run_until_idle():
        outs.setdefault(out.rid, []).append(out)
    failed = outs["broken"][-1].finish
    assert failed.kind == "error" and "did not compile" in failed.message and outs["broken"][-1].new_token_ids == []
    assert outs["plain"][-1].finish is not None and outs["plain"][-1].completion_tokens == 4
    assert not engine.has_work()


def test_an_aborted_requests_queued_compile_never_runs(llm: LLM, tiny_ds: str, compile_gate: CompileGate) -> None:
    """One thread compiles: the compile of a request aborted while queued behind another is cancelled, so it delays
    neither later compiles nor the process's exit; the request ahead of it completes."""
    engine = llm.engine
    engine.add_request("first", PROMPT, _constrained(tiny_ds))  # its compile holds the thread (the gate)
    engine.add_request("second", PROMPT, _constrained(tiny_ds))
    second = engine.requests["second"]
    assert engine.abort("second") and second.grammar_compile.cancelled()
    compile_gate.set()
    outs = {out.rid: out for out in engine.run_until_idle()}
    assert outs["second"].finish.kind == "abort" and outs["first"].finish.kind != "error"
    assert not engine.has_work() and engine.grammars.held == []


def test_a_compile_that_cannot_start_leaves_nothing_behind(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile thread cannot start (a process at its thread limit): the request is refused and nothing of it
    stays. It started after the request was queued: held with no compile (every later step raised), or on a PD
    decode server holding its room and pages for good."""
    import concurrent.futures

    from dsaserve.engine.request import DisaggRoute
    from test_disagg_engine import assert_pools_whole, pd_pair

    def no_thread(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")
    engine = LLM(tiny_ds, page_size=4, max_total_tokens=2048).engine
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", no_thread)
        for e, route in ((engine, None), (dec, DisaggRoute(9, f"tcp://127.0.0.1:{pre.disagg.port}"))):
            with pytest.raises(RuntimeError, match="new thread"):  # (the worker answers 500)
                e.add_request("g", PROMPT, _constrained(tiny_ds), route)
            assert not e.grammars.held and not e.scheduler.in_transit and not e.scheduler.waiting
        assert not dec.disagg.rooms
        monkeypatch.undo()
        assert_pools_whole(engine, dec)
        engine.add_request("after", PROMPT, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert [o.finish.kind for o in engine.run_until_idle() if o.finished] == ["length"]
