"""PD disaggregation inside one process: a prefill engine and a decode engine with real NIXL agents (UCX on
loopback) and real ZMQ control sockets, driven step by step. Greedy tokens equal the aggregated engine's
for prompts ending one token before, exactly at and one token after a page boundary, at page sizes 1 and
64, with MTP speculation off and on, for both architectures; failures end requests and return pages."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ARCHS, CompileGate, prompts_ids, sampling_features
from dsaserve import LLM, SamplingParams
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import DisaggRoute, RequestOutput
from dsaserve.model.checkpoint import weights_fingerprint
from dsaserve.server_args import ServerArgs
from dsaserve.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
_rooms = itertools.count(1000)


def lengths(page_size: int) -> list[int]:
    edge = 64 if page_size == 64 else 16  # page size 1: every token opens a page; 16 = index_topk
    return [edge - 1, edge, edge + 1, 3]


@contextlib.contextmanager
def pd_pair(model: str, backend: str = "nixl", prefill: dict | None = None, decode: dict | None = None,
            **kw: object) -> Iterator[tuple[Engine, Engine]]:
    """A prefill and a decode engine (`prefill` / `decode`: flags of one side only); their transfer agents and
    sockets are closed afterwards (a NIXL agent or a ZMQ context left to the garbage collector can block it)."""
    common = dict(model_path=model, max_total_tokens=2048, disaggregation_transfer_backend=backend, **kw)
    engines = [Engine(ServerArgs(disaggregation_mode=mode, **{**common, **(own or {})}), progress=False)
               for mode, own in (("prefill", prefill), ("decode", decode))]
    try:
        yield engines[0], engines[1]
    finally:
        for e in engines:
            e.disagg.close()


def run_pd(pre: Engine, dec: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
           limit_s: float = 240.0, logprobs: dict[str, list] | None = None,
           ) -> tuple[dict[str, RequestOutput], dict[str, list[int]]]:
    """Send every prompt to both engines (as the router does) and step both until idle; the decode engine's
    final outputs and tokens by request id (and its log-probabilities into `logprobs` when given). One
    SamplingParams for all prompts or one per prompt. A run unfinished after `limit_s` fails with both sides'
    state (a liveness bound: these runs take seconds)."""
    peer = f"tcp://127.0.0.1:{pre.disagg.port}"
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt)):
        room = next(_rooms)
        pre.add_request(f"r{i}", ids, p, DisaggRoute(room))
        dec.add_request(f"r{i}", ids, p, DisaggRoute(room, peer))
    final: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pre.step()
        for out in dec.step():
            tokens[out.rid] += out.new_token_ids
            if logprobs is not None:
                logprobs.setdefault(out.rid, []).extend(out.new_logprobs)
            if out.finished:
                final[out.rid] = out
        if len(final) == len(prompts) and not (pre.has_work() or dec.has_work()):
            return final, tokens
        if not (pre.has_work() or dec.has_work()):
            time.sleep(0.002)  # a control message is on its way between the engines
    raise AssertionError(f"the PD run did not finish in {limit_s:.0f} s: {pd_state(pre, dec, final)}")


def pd_state(pre: Engine, dec: Engine, final: dict[str, RequestOutput]) -> str:
    """Where each side's requests are: what a hung run's failure shows."""
    rooms = {room: ("sent" if inc.sent else "unsent") + (", done seen" if inc.done is not None else "")
             for room, inc in dec.disagg.rooms.items()}
    out = {room: ("writing" if o.handle is not None else "dest known" if o.dest is not None else "awaiting dest")
           for room, o in pre.disagg.out.items()}
    return (f"finished {sorted(final)}; decode: work {dec.has_work()}, requests {sorted(dec.requests)}, rooms "
            f"{rooms}; prefill: work {pre.has_work()}, requests {sorted(pre.requests)}, outgoing {out}")


def assert_pools_whole(*engines: Engine) -> None:
    for e in engines:
        stats = e.stats()
        assert stats.free_pages == stats.total_pages, "pages leaked"
        assert not e.requests


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("spec_steps", [0, 2])
def test_pd_greedy_equals_aggregated(arch: str, page_size: int, spec_steps: int,
                                     tiny_models: dict[str, str]) -> None:
    model = tiny_models[arch]
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=spec_steps) if spec_steps else {}
    prompts = prompts_ids(4, lengths(page_size), seed=7)
    expected = [c.token_ids for c in LLM(model, page_size=page_size, max_total_tokens=2048).generate(prompts, GREEDY)]
    with pd_pair(model, page_size=page_size, chunked_prefill_size=7, **spec) as (pre, dec):  # prompts in chunks
        final, tokens = run_pd(pre, dec, prompts, GREEDY)
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
        assert all(final[f"r{i}"].finish.kind == "length" for i in range(len(prompts)))
        if spec_steps:  # the decode server's first step verified the prefill server's drafts
            assert dec.stats().spec_verify_steps > 0
        assert pre.steps <= sum(-(-len(ids) // 7) for ids in prompts)  # prompt chunks only, never a decode step
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size,spec_steps", [(1, 2), (64, 0)])
def test_pd_over_fp8_cache_equals_aggregated(arch: str, page_size: int, spec_steps: int,
                                             tiny_models: dict[str, str]) -> None:
    """`--kv-cache-dtype fp8_e4m3` on both servers: the pages move as their 656-byte latent rows and 132-byte
    index-key rows, and decoding over them gives the aggregated FP8-cache engine's tokens."""
    model = tiny_models[arch]
    flags = dict(page_size=page_size, kv_cache_dtype="fp8_e4m3")
    if spec_steps:
        flags.update(speculative_algorithm="NEXTN", speculative_num_steps=spec_steps)
    prompts = prompts_ids(4, lengths(page_size), seed=8)
    flags.update(chunked_prefill_size=7)  # both sides chunk alike: e4m3 rounding amplifies a GEMM's last bit
    expected = [c.token_ids for c in LLM(model, max_total_tokens=2048, **flags).generate(prompts, GREEDY)]
    with pd_pair(model, **flags) as (pre, dec):
        _, tokens = run_pd(pre, dec, prompts, GREEDY)
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("spec_steps", [0, 2])
def test_pd_sampling_features_equal_aggregated(spec_steps: int, tiny_ds: str) -> None:
    """The prefill server samples the first token, the decode server the rest: seeded top-p sampling, penalties,
    log-probabilities, a JSON-schema grammar (greedy and sampled) and a stop string give the aggregated
    engine's tokens, log-probabilities and finish reasons, with MTP off and on."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=spec_steps) if spec_steps else {}
    features = sampling_features(tiny_ds, prompts_ids(3, [5, 20, 9], seed=2))
    all_prompts, all_params = [p for p, _ in features], [k for _, k in features]
    want = LLM(tiny_ds, max_total_tokens=2048, page_size=4, **spec).generate(all_prompts, all_params)
    assert want[-3].finish_reason.kind == "stop"  # the stop string ends the first prompt's output
    logprobs: dict[str, list] = {}
    with pd_pair(tiny_ds, page_size=4, **spec) as (pre, dec):
        final, tokens = run_pd(pre, dec, all_prompts, all_params, logprobs=logprobs)
        for i, (w, p) in enumerate(zip(want, all_params)):
            assert tokens[f"r{i}"] == w.token_ids, p
            assert final[f"r{i}"].finish.kind == w.finish_reason.kind, p
            if p.logprobs:
                got = logprobs[f"r{i}"]
                assert len(got) == len(w.logprobs)
                for (lp, top), (want_lp, want_top) in zip(got, w.logprobs):
                    assert abs(lp - want_lp) < 1e-5 and [t for t, _ in top] == [t for t, _ in want_top]
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_pd_sides_sample_a_request_only_once_its_grammar_compiled(side: str, tiny_ds: str,
                                                                   compile_gate: CompileGate) -> None:
    """While one side's compile of a request's grammar is held, the request beside it runs to its end and that
    request gets no token (the prefill side does not admit it; the decode side, its KV cache arrived, does not
    resume it): sampling it would wait in the step loop for the compile. Once compiled it gives the aggregated
    engine's tokens."""
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = checked_spec(json_grammar(schema), tiny_ds, (1,))
    params = [GREEDY, SamplingParams(max_tokens=12, temperature=0.0, grammar=spec)]
    prompts = prompts_ids(2, [7, 9], seed=3)
    mine = dataclasses.replace(spec)  # an equal spec, another object: only this side's compile waits
    compile_gate.only(mine)
    want = [c.token_ids for c in LLM(tiny_ds, max_total_tokens=2048, page_size=4).generate(prompts, params)]
    with pd_pair(tiny_ds, page_size=4) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        for i, (ids, p) in enumerate(zip(prompts, params)):
            room, own = next(_rooms), dataclasses.replace(p, grammar=mine) if p.grammar is not None else p
            pre.add_request(f"r{i}", ids, own if side == "prefill" else p, DisaggRoute(room))
            dec.add_request(f"r{i}", ids, own if side == "decode" else p, DisaggRoute(room, peer))
        tokens: dict[str, list[int]] = {"r0": [], "r1": []}
        deadline = time.monotonic() + 120
        while ("r0" in dec.requests or (side == "decode" and "r1" in pre.requests)) and time.monotonic() < deadline:
            pre.step()
            for out in dec.step():
                tokens[out.rid] += out.new_token_ids
            time.sleep(0.002)
        assert tokens["r0"] == want[0] and "r0" not in dec.requests  # the other request ran to its end
        assert tokens["r1"] == [] and "r1" in dec.requests  # (decode side: its KV cache came, r1 left the prefill)
        assert ("r1" in pre.requests and pre.requests["r1"].output_ids == []) == (side == "prefill")
        compile_gate.set()
        while ("r1" in dec.requests or pre.has_work() or dec.has_work()) and time.monotonic() < deadline:
            pre.step()
            for out in dec.step():
                tokens[out.rid] += out.new_token_ids
        assert tokens["r1"] == want[1]
        assert_pools_whole(pre, dec)


def test_prefill_leader_blocks_while_a_grammar_compiles(tiny_ds: str, compile_gate: CompileGate) -> None:
    """Page ids came for a request whose grammar still compiles: the prefill leader may block (the compiler's wake
    fd wakes it) instead of polling every millisecond for the whole compile; once it ended the request runs."""
    import select
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    params = SamplingParams(max_tokens=8, temperature=0.0, grammar=checked_spec(json_grammar(schema), tiny_ds, (1,)))
    ids = prompts_ids(1, [9], seed=3)[0]
    with pd_pair(tiny_ds, page_size=4) as (pre, dec):
        room, deadline = next(_rooms), time.monotonic() + 120
        pre.add_request("r", ids, params, DisaggRoute(room))
        dec.add_request("r", ids, params, DisaggRoute(room, f"tcp://127.0.0.1:{pre.disagg.port}"))
        while room not in pre.disagg.dests and time.monotonic() < deadline:
            dec.step()
            pre.step()
        assert room in pre.disagg.dests and room in pre.disagg.pending  # (held for its compile)
        assert pre.disagg.wait_ms() > 1000  # a pending request's deadline, not a 1-ms poll
        compile_gate.set()
        assert select.select([pre.grammars.wake_fd], [], [], 60)[0]  # what the worker's wait wakes on
        pre.grammars.ready()  # (the worker drains the fd before the sides look: see WorkerLoop._background)
        assert pre.disagg.wait_ms() == 1  # now one to admit
        while "r" in dec.requests and time.monotonic() < deadline:
            pre.step()
            dec.step()
        assert "r" not in dec.requests and "r" not in pre.requests


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_a_grammar_that_fails_to_compile_on_one_side_ends_that_request(side: str, tiny_ds: str) -> None:
    """A spec whose compile fails on one server (one that skipped checked_spec: its tokenizer cannot be loaded)
    ends that request with the compile's error (the prefill side failed the request's whole batch with it when
    sampling; the decode side raised out of its transfer poll, ending the rank); the request beside it completes
    and both pools are whole."""
    from dsaserve.chat.grammar import GrammarSpec, checked_spec, json_grammar
    grammar = json_grammar({"type": "object"})
    good = SamplingParams(max_tokens=4, temperature=0.0, grammar=checked_spec(grammar, tiny_ds, (1,)))
    broken = dataclasses.replace(good, grammar=GrammarSpec(grammar, "/nonexistent/tokenizer", (1,)))
    prompts = prompts_ids(2, [7, 9], seed=3)
    with pd_pair(tiny_ds, page_size=4) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        for i, (ids, params) in enumerate(zip(prompts, [GREEDY, good])):
            room = next(_rooms)
            pre.add_request(f"r{i}", ids, broken if i and side == "prefill" else params, DisaggRoute(room))
            dec.add_request(f"r{i}", ids, broken if i and side == "decode" else params, DisaggRoute(room, peer))
        final: dict[str, RequestOutput] = {}
        deadline = time.monotonic() + 120
        while (len(final) < 2 or pre.requests or dec.requests) and time.monotonic() < deadline:
            pre.step()
            final |= {out.rid: out for out in dec.step() if out.finished}
            time.sleep(0.002)
        assert final["r1"].finish.kind == "error" and "did not compile" in final["r1"].finish.message
        assert final["r0"].finish.kind == "length" and final["r0"].completion_tokens == GREEDY.max_tokens
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("spec_steps", [0, 2])
def test_decode_side_prefix_cache_skips_cached_pages(spec_steps: int, tiny_ds: str) -> None:
    """A prompt that shares full pages with one the decode server served before takes them from its prefix
    cache: the prefill server sends only the pages after them (a full-prompt write into the shorter page
    list would fail as a page-count mismatch), usage reports them as cached, and the greedy tokens equal
    the aggregated engine's. With MTP the last shared page is not reused (prefix.py)."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=spec_steps) if spec_steps else {}
    first = prompts_ids(1, [30], seed=9)[0]
    second = first[:24] + prompts_ids(1, [7], seed=10)[0]  # 6 full pages of 4 shared
    expected = [c.token_ids for c in LLM(tiny_ds, page_size=4, max_total_tokens=2048, **spec).generate(
        [first, second], GREEDY)]
    with pd_pair(tiny_ds, page_size=4, **spec) as (pre, dec):
        _, tokens = run_pd(pre, dec, [first], GREEDY)
        assert tokens["r0"] == expected[0]
        hits = dec.stats().prefix_hit_tokens
        final, tokens = run_pd(pre, dec, [second], GREEDY)
        shared = 24 - 4 * bool(spec_steps)
        assert tokens["r0"] == expected[1]
        assert final["r0"].cached_tokens == shared and dec.stats().prefix_hit_tokens - hits == shared
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("prefill,decode,words", [
    ({"kv_cache_dtype": "fp8_e4m3"}, {}, "the KV cache layouts differ"),
    ({"page_size": 64}, {"page_size": 1}, "page sizes differ: decode 1, prefill 64"),
    ({"dtype": "float16"}, {"dtype": "bfloat16"},  # rows of equal bytes that mean different numbers
     "the KV cache formats differ: the decode server holds bfloat16 rows, this server float16 rows"),
    ({"dtype": "float16", "kv_cache_dtype": "fp8_e4m3"}, {"dtype": "bfloat16", "kv_cache_dtype": "fp8_e4m3"},
     "--dtype differs: decode bfloat16, prefill float16")])  # (FP8 rows alike: the transport cannot tell)
def test_mismatched_servers_end_requests_with_the_reason(prefill: dict, decode: dict, words: str,
                                                         tiny_ds: str) -> None:
    """A prefill and a decode server whose caches cannot exchange pages (cache dtype, page size, row format):
    every request ends with an error naming the difference, and both pools are whole."""
    with pd_pair(tiny_ds, prefill=prefill, decode=decode) as (pre, dec):
        final, tokens = run_pd(pre, dec, prompts_ids(2, [5, 9], seed=1), GREEDY)
        for rid, out in final.items():
            assert out.finish.kind == "error" and words in out.finish.message and not tokens[rid]
        assert len(final) == 2
        assert_pools_whole(pre, dec)


def test_servers_that_loaded_different_weights_end_requests_with_the_reason(tiny_ds: str, tmp_path) -> None:
    """The same config with other weights (a fine-tune: another seed) on the prefill server: pages of the same
    layout, but its KV would be wrong for the decode server's model. Every request ends with an error naming
    the difference, both pools are whole; the fingerprints also tell a copy of the checkpoint from it."""
    other = make_tiny_model(tmp_path / "other", "deepseek_v32", seed=1)
    copy = shutil.copytree(tiny_ds, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere"}))
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_ds) != weights_fingerprint(other)
    with pd_pair(tiny_ds, prefill={"model_path": str(other)}) as (pre, dec):
        final, tokens = run_pd(pre, dec, prompts_ids(2, [5, 9], seed=1), GREEDY)
        for rid, out in final.items():
            assert out.finish.kind == "error" and "loaded different models" in out.finish.message, out.finish
            assert not tokens[rid]
        assert len(final) == 2
        assert_pools_whole(pre, dec)


def test_injected_failures_end_requests_and_free_pages(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSASERVE_DISAGG_TEST_FAILURE_PROB", "1")
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        final, tokens = run_pd(pre, dec, prompts_ids(3, [4, 9, 2], seed=1), GREEDY)
        assert len(final) == 3 and not any(tokens.values())
        for out in final.values():
            assert out.finish.kind == "error" and "injected transfer failure" in out.finish.message
        assert_pools_whole(pre, dec)


def test_decode_abort_while_waiting_frees_both_sides(tiny_ds: str) -> None:
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        ids = prompts_ids(1, [9], seed=2)[0]
        dec.add_request("d", ids, GREEDY, DisaggRoute(5, peer))  # the prefill server has not got it yet
        assert dec.stats().free_pages < dec.stats().total_pages  # pre-allocated
        assert dec.abort("d")
        assert [o.finish.kind for o in dec.step()] == ["abort"]
        pre.add_request("p", ids, GREEDY, DisaggRoute(5))
        deadline = time.monotonic() + 30
        outputs: list[RequestOutput] = []
        while (pre.requests or dec.stats().free_pages < dec.stats().total_pages) and time.monotonic() < deadline:
            outputs += pre.step()  # the prefill server learns of the cancel, the decode server of its answer
            dec.step()
            time.sleep(0.002)
        assert any(o.finished and o.finish.kind == "abort" for o in outputs)
        assert_pools_whole(pre, dec)


def _write_in_flight(pre: Engine, dec: Engine, monkeypatch: pytest.MonkeyPatch, ids: list[int]) -> None:
    """Request "p" / "d" (room 7) stepped until its KV write is in flight (every write takes one more poll)."""
    transport, polled = pre.disagg.transport, set()
    real_poll = transport.poll

    def slow_poll(handle: object) -> bool:
        if handle in polled:
            return real_poll(handle)
        polled.add(handle)
        return False
    monkeypatch.setattr(transport, "poll", slow_poll)
    pre.add_request("p", ids, GREEDY, DisaggRoute(7))
    dec.add_request("d", ids, GREEDY, DisaggRoute(7, f"tcp://127.0.0.1:{pre.disagg.port}"))
    deadline = time.monotonic() + 30
    while not (7 in pre.disagg.out and pre.disagg.out[7].handle is not None) and time.monotonic() < deadline:
        pre.step()
        dec.step()
        time.sleep(0.002)
    assert pre.disagg.out[7].handle is not None  # the write is in flight


def _finals_until_idle(pre: Engine, dec: Engine) -> list[RequestOutput]:
    finals, deadline = [], time.monotonic() + 30
    while (pre.requests or dec.requests or pre.disagg.out) and time.monotonic() < deadline:
        finals += [out for out in pre.step() + pre.take_finished() + dec.step() + dec.take_finished() if out.finished]
        time.sleep(0.002)
    return finals


@pytest.mark.parametrize("backend", ["fake", "nixl"])
def test_prefill_abort_during_the_write_ends_the_decode_side_too(backend: str, tiny_ds: str, monkeypatch) -> None:
    """A client's abort on the prefill server while the KV write is in flight ends the request on the decode
    server as an earlier abort does: it was handed over and ran on. The write's arrival, which the decode server
    no longer looks up, is not kept (NIXL kept it for good)."""
    with pd_pair(tiny_ds, backend=backend, page_size=4) as (pre, dec):
        ids = prompts_ids(1, [9], seed=3)[0]
        _write_in_flight(pre, dec, monkeypatch, ids)
        assert pre.abort("p")
        finals = {out.rid: out for out in _finals_until_idle(pre, dec)}
        assert finals["p"].finish.kind == "abort"
        assert finals["d"].finish.kind == "abort" and "aborted on the prefill server" in finals["d"].finish.message
        assert_pools_whole(pre, dec)
        final, _ = run_pd(pre, dec, [ids], GREEDY)  # the next request's wait takes in what arrived since
        assert final["r0"].finish.kind == "length"
        if backend == "nixl":
            assert not dec.disagg.transport.nixl.notifs, dec.disagg.transport.nixl.notifs


def test_a_write_ending_after_its_abort_leaves_a_new_request_of_that_rid_alone(tiny_ds: str, monkeypatch) -> None:
    """Once an aborted request's final output went out, its client may reuse the rid. The aborted request's
    write, landing later, ended the new one: the prefill side looked the request up by rid (its client got an
    abort it never asked for, and the new request, gone from the engine but still scheduled, failed every batch
    it was in and never gave its pages back)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        ids, again = prompts_ids(2, [9, 11], seed=3)
        _write_in_flight(pre, dec, monkeypatch, ids)
        assert pre.abort("p")
        pre.add_request("p", again, GREEDY, DisaggRoute(8))
        dec.add_request("d2", again, GREEDY, DisaggRoute(8, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = _finals_until_idle(pre, dec)
        assert [out.finish.kind for out in finals if out.rid == "p"] == ["abort", "length"]
        assert [out.finish.kind for out in finals if out.rid == "d2"] == ["length"]
        assert_pools_whole(pre, dec)


def test_prefill_without_decode_times_out(tiny_ds: str) -> None:
    pre = Engine(ServerArgs(model_path=tiny_ds, max_total_tokens=512, disaggregation_mode="prefill",
                            disaggregation_transfer_backend="fake", disaggregation_timeout_s=0.5), progress=False)
    pre.add_request("p", [5, 6, 7], GREEDY, DisaggRoute(9))
    outputs: list[RequestOutput] = []
    deadline = time.monotonic() + 30
    while not any(o.finished for o in outputs) and time.monotonic() < deadline:
        outputs += pre.step()
        time.sleep(0.01)
    pre.disagg.close()
    final = [o for o in outputs if o.finished]
    assert final and final[0].finish.kind == "error" and "no decode server asked" in final[0].finish.message
    assert_pools_whole(pre)


@pytest.mark.parametrize("flags, message", [
    (dict(disaggregation_mode="both"), "--disaggregation-mode must be null, prefill or decode"),
    (dict(disaggregation_mode="prefill", disaggregation_transfer_backend="mooncake"), "mooncake is not available"),
    (dict(disaggregation_timeout_s=0), "--disaggregation-timeout-s must be > 0"),
    (dict(disaggregation_timeout_s=float("nan")), "--disaggregation-timeout-s must be > 0 and finite, got nan"),
    (dict(disaggregation_timeout_s=float("inf")), "--disaggregation-timeout-s must be > 0 and finite, got inf"),
    (dict(disaggregation_ib_device='{"0": "mlx5_0"}'), "a per-GPU JSON map or file .SGLang's Mooncake form"),
    (dict(disaggregation_ib_device="/etc/ib.json"), "--disaggregation-ib-device takes device names"),
])
def test_flags_refuse_what_cannot_work(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs(**flags)


def test_sglangs_ib_device_names_become_ucx_ports(tmp_path: Path) -> None:
    """SGLang's --disaggregation-ib-device names RDMA devices bare (for Mooncake); UCX_NET_DEVICES names their port
    (mlx5_0:1; an mlx5 function has one). Other RDMA devices the machine lists (its /sys/class/infiniband: a bonded
    mlx5, Broadcom's bnxt_re) too; ports, network interfaces and "all" pass as given."""
    from dsaserve.disagg.transport import ucx_net_devices
    for name in ("mlx5_bond_0", "bnxt_re0"):
        (tmp_path / name).mkdir()
    assert ucx_net_devices("mlx5_0,mlx5_1", str(tmp_path)) == "mlx5_0:1,mlx5_1:1"
    assert ucx_net_devices("mlx5_bond_0,bnxt_re0,eth0", str(tmp_path)) == "mlx5_bond_0:1,bnxt_re0:1,eth0"
    assert ucx_net_devices("mlx5_0:1, mlx5_3:2,eth0", str(tmp_path)) == "mlx5_0:1,mlx5_3:2,eth0"
    assert ucx_net_devices("all", str(tmp_path)) == "all"


def test_failure_probability_must_be_a_probability(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSASERVE_DISAGG_TEST_FAILURE_PROB", "1.5")
    with pytest.raises(ValueError, match=r"DSASERVE_DISAGG_TEST_FAILURE_PROB must be in \[0, 1\], got 1.5"):
        Engine(ServerArgs(model_path=tiny_ds, max_total_tokens=256, disaggregation_mode="prefill",
                          disaggregation_transfer_backend="fake"), progress=False)


def test_pd_with_deterministic_inference_is_the_aggregated_solo_run(tiny_ds: str) -> None:
    """--enable-deterministic-inference on both sides (MTP, page 1, prompts in chunks of 7, beside 7 others): the
    request's tokens and log-probabilities are bitwise its solo aggregated run's, the prefill server's first token
    included (tests/test_deterministic.py holds the aggregated cases)."""
    from test_deterministic import BASE, BESIDE, GREEDY, OTHERS, SEEDED, TARGET, scored
    solo = LLM(tiny_ds, **BASE, enable_deterministic_inference=True, disable_radix_cache=True)
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=2)
    flags = dict(page_size=1, chunked_prefill_size=7, enable_deterministic_inference=True, **spec)
    with pd_pair(tiny_ds, **flags) as (pre, dec):
        for params in (GREEDY, SEEDED):
            logprobs: dict[str, list] = {}
            _, tokens = run_pd(pre, dec, [TARGET] + OTHERS, [params] + BESIDE, logprobs=logprobs)
            got = list(zip(tokens["r0"], [lp for lp, _ in logprobs["r0"]]))
            assert got == scored(solo.generate([TARGET], params)[0]), params
        assert_pools_whole(pre, dec)
