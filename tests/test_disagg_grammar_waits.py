"""PD disaggregation: a request whose output grammar still compiles when its wait runs out ends with an error that
names the compile, not the other server. Each side holds such a request until its grammar compiled (the prefill
side does not admit it, the decode side does not resume it); the compile is held by the test's gate and the sides'
deadlines run on a clock the test moves. Engines in one process, real ZMQ control sockets, the `fake` transfer."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import CompileGate, prompts_ids
from dsaserve import SamplingParams
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import DisaggRoute
from test_disagg_engine import assert_pools_whole, pd_pair
from test_disagg_waits import step_until

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 10.0  # --disaggregation-timeout-s of both servers


def grammar_params(model: str, gate: CompileGate) -> tuple[SamplingParams, SamplingParams]:
    """Two requests' params with equal JSON grammars: the gate holds the compile of the first only."""
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    free = SamplingParams(max_tokens=6, temperature=0.0, grammar=checked_spec(json_grammar(schema), model, (1,)))
    held = dataclasses.replace(free, grammar=dataclasses.replace(free.grammar))  # an equal spec, another object
    gate.only(held.grammar)
    return held, free


def on_clock(now: list[float], monkeypatch: pytest.MonkeyPatch, *engines: Engine) -> None:
    for e in engines:
        monkeypatch.setattr(e.disagg.deadlines, "clock", lambda: now[0])


@pytest.mark.parametrize("first", ["request", "page ids"])
def test_prefill_names_the_compile_a_request_waited_on(first: str, tiny_ds: str, compile_gate: CompileGate,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The page ids came, the grammar still compiles: once no write into those pages could start in time (half
    the timeout after they came) both halves end, saying so. They used to wait for the prefill request's or the
    page ids' own timeout and blame the decode server: "no decode server asked for bootstrap room ..." or "no
    request on the prefill server claimed the page ids ..."."""
    now = [0.0]
    held, free = grammar_params(tiny_ds, compile_gate)
    ids, room = prompts_ids(1, [9], seed=21)[0], 51
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=TIMEOUT_S) as (pre, dec):
        on_clock(now, monkeypatch, pre, dec)
        if first == "request":
            pre.add_request("p", ids, held, DisaggRoute(room))
        dec.add_request("d", ids, free, DisaggRoute(room, f"tcp://127.0.0.1:{pre.disagg.port}"))
        step_until((pre, dec), lambda f: room in pre.disagg.dests, 15)
        now[0] = 1.0
        if first == "page ids":
            pre.add_request("p", ids, held, DisaggRoute(room))
        now[0] = TIMEOUT_S / 2 - 0.5  # the pages may still be written: the request waits on
        pre.step()
        assert room in pre.disagg.pending and room in pre.disagg.dests
        now[0] = TIMEOUT_S / 2
        finals = step_until((pre, dec), lambda f: {"p", "d"} <= set(f), 15)
        assert {"p", "d"} <= set(finals), f"still waiting once the pages could no longer be written: {sorted(finals)}"
        waited = TIMEOUT_S / 2 - (0.0 if first == "request" else 1.0)
        reason = f"its output grammar was still compiling on the prefill server after {waited:.1f} s"
        assert finals["p"].finish.kind == "error" and reason in finals["p"].finish.message, finals["p"].finish
        assert finals["d"].finish.kind == "error" and reason in finals["d"].finish.message, finals["d"].finish
        assert_pools_whole(pre, dec)


def test_decode_names_the_compile_a_request_waited_on(tiny_ds: str, compile_gate: CompileGate,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV cache and the first token came, the grammar still compiles on the decode server when its timeout
    passes: the request ends naming the compile (it used to say "no KV cache from the prefill server")."""
    now = [0.0]
    held, free = grammar_params(tiny_ds, compile_gate)
    ids, room = prompts_ids(1, [9], seed=22)[0], 52
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=TIMEOUT_S) as (pre, dec):
        on_clock(now, monkeypatch, pre, dec)
        pre.add_request("p", ids, free, DisaggRoute(room))
        dec.add_request("d", ids, held, DisaggRoute(room, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = step_until((pre, dec), lambda f: "p" in f and dec.disagg.rooms[room].done is not None, 15)
        assert finals["p"].finish.kind == "length" and "d" in dec.requests  # handed over; held for its compile
        now[0] = TIMEOUT_S
        finals = step_until((dec,), lambda f: "d" in f, 15)
        reason = f"its output grammar was still compiling on the decode server after {TIMEOUT_S:.1f} s"
        assert finals["d"].finish.kind == "error" and reason in finals["d"].finish.message, finals["d"].finish
        assert room not in dec.disagg.rooms
        assert_pools_whole(pre, dec)
