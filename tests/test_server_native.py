"""The HTTP server's SGLang-native routes (/generate single, batched and streamed, its sampling and log-probability
options, /flush_cache) and its info routes (/get_server_info, /health, /get_model_info, /v1/models, /metrics): the
same greedy tokens as LLM.generate. The OpenAI routes: test_server_openai.py (a server of its own, as every server
test module has)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from dsaserve import LLM, SamplingParams
from server_process import ServerProcess, module_server

pytestmark = pytest.mark.timeout(180)
FLAGS = dict(page_size=4, max_total_tokens=4096)
PROMPTS = ["Hello world", "The quick brown fox"]
MAX = 10


@pytest.fixture(scope="module")
def server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(tiny_ds, tmp_path_factory, **FLAGS, log_requests=True, log_requests_level=3)


@pytest.fixture(scope="module")
def llm(tiny_ds: str) -> LLM:
    return LLM(tiny_ds, **FLAGS)


def greedy(llm: LLM, prompts: list, **kw) -> list:
    return llm.generate(prompts, SamplingParams(max_tokens=MAX, temperature=0.0, ignore_eos=True, **kw))


def test_native_generate_and_info(server: ServerProcess, llm: LLM) -> None:
    exp = greedy(llm, [[5, 6, 7]])[0]
    r = httpx.post(f"{server.url}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}}, timeout=60).json()
    assert r["output_ids"] == exp.token_ids and r["text"] == exp.text
    assert r["meta_info"]["finish_reason"] == {"type": "length", "length": MAX}  # (SGLang's FINISH_LENGTH)
    assert (r["meta_info"]["prompt_tokens"], r["meta_info"]["completion_tokens"]) == (3, MAX)
    with httpx.stream("POST", f"{server.url}/generate", timeout=60, json={
            "text": "Hello", "stream": True, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 2

    info = server.server_info()
    assert info["page_size"] == 4 and info["internal_states"][0]["running"] == 0
    assert set(info["internal_states"][0]) >= {"running", "waiting", "free_pages", "total_pages", "num_retractions"}
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/health_generate", timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/get_model_info").json()["vocab_size"] == llm.engine.cfg.vocab_size
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    name = Path(llm.engine.model_path).name
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other")
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [True, 2.0]})  # not token ids
    assert r.status_code == 400 and "tokens" in r.text, r.text
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("dsaserve_num_running_reqs", "dsaserve_num_queue_reqs", "dsaserve_token_usage",
                 "dsaserve_prompt_tokens_total", "dsaserve_generation_tokens_total",
                 "dsaserve_time_to_first_token_seconds_bucket", "dsaserve_inter_token_latency_seconds_bucket",
                 "dsaserve_e2e_request_latency_seconds_bucket"):
        assert name in metrics


def test_native_generate_takes_a_batch(server: ServerProcess, llm: LLM) -> None:
    """SGLang's batch on /generate (a list of texts or of token-id lists, optional rid per prompt): a list of
    results equal to each prompt alone, or one stream whose chunks carry their prompt's index."""
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    exp = greedy(llm, prompts)
    sampling = {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server.url}/generate", timeout=60,
                   json={"input_ids": prompts, "rid": ["b-0", "b-1"], "sampling_params": sampling})
    assert r.status_code == 200, r.text
    assert [x["output_ids"] for x in r.json()] == [e.token_ids for e in exp]
    assert [x["meta_info"]["id"] for x in r.json()] == ["b-0", "b-1"]
    texts = httpx.post(f"{server.url}/generate", timeout=60, json={"text": PROMPTS[:2], "sampling_params": sampling})
    assert [x["output_ids"] for x in texts.json()] == [e.token_ids for e in greedy(llm, PROMPTS[:2])]
    with httpx.stream("POST", f"{server.url}/generate", timeout=60,
                      json={"input_ids": prompts, "stream": True, "sampling_params": sampling}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    last = {e["index"]: e["output_ids"] for e in events}
    assert last == {0: exp[0].token_ids, 1: exp[1].token_ids}
    bad = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": prompts, "rid": ["only-one"]})
    assert bad.status_code == 400 and "1 rid for 2 prompts" in bad.text


def test_native_generate_takes_sampling_params_per_prompt(server: ServerProcess, llm: LLM) -> None:
    """SGLang's list of sampling_params, one per prompt of a batch (it was a 400): each prompt runs with its own;
    a list of another length, with differing n or with a bad field is a 400 naming it."""
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    exp = greedy(llm, prompts)
    per = [{"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
           {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}]
    r = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": prompts, "sampling_params": per})
    assert r.status_code == 200, r.text
    assert [x["output_ids"] for x in r.json()] == [exp[0].token_ids[:2], exp[1].token_ids]
    for params, says in (([per[0]], "1 sampling_params for 2 prompts"), ([{**per[0], "n": 2}, per[1]], "n differs"),
                         ([per[0], {"max_new_token": 3}], "sampling_params.1.max_new_token")):
        bad = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": prompts, "sampling_params": params})
        assert bad.status_code == 400 and says in bad.text, bad.text


def test_native_generate_with_no_new_tokens_scores_the_prompt(server: ServerProcess) -> None:
    """SGLang's `max_new_tokens: 0`: no output, finish `length`, the prompt's log-probabilities those of a run that
    generates (it was refused with a 400)."""
    def generate(n: int, stream: bool = False) -> dict:
        body = {"input_ids": [5, 6, 7, 8], "return_logprob": True, "logprob_start_len": 0, "stream": stream,
                "sampling_params": {"max_new_tokens": n, "temperature": 0}}
        if not stream:
            r = httpx.post(f"{server.url}/generate", timeout=60, json=body)
            assert r.status_code == 200, r.text
            return r.json()
        with httpx.stream("POST", f"{server.url}/generate", timeout=60, json=body) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert len(events) == 1
        return events[0]
    generating = generate(2)
    for scored in (generate(0), generate(0, stream=True)):
        meta = scored["meta_info"]
        assert (scored["text"], scored["output_ids"], meta["completion_tokens"]) == ("", [], 0)
        assert meta["finish_reason"]["type"] == "length" and meta["output_token_logprobs"] == []
        assert meta["input_token_logprobs"] == generating["meta_info"]["input_token_logprobs"]
        assert len(meta["input_token_logprobs"]) == 4


def test_sglang_generate_options(server: ServerProcess, llm: LLM, tiny_ds: str) -> None:
    """SGLang's /generate: log-probability entries are [logprob, token id, text or None] (they were pairs) and top
    lists come only when asked for; sampling_params n, regex and json_schema work (they were 400s), and
    skip_special_tokens false keeps special tokens in the text."""
    from dsaserve.engine.tokenizer import Tokenizer
    tok = Tokenizer(tiny_ds)

    def generate(**body) -> dict | list:
        r = httpx.post(f"{server.url}/generate", timeout=60, json=body)
        assert r.status_code == 200, r.text
        return r.json()
    exp = greedy(llm, [[5, 6, 7]])[0]
    sampling = {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}
    for with_text in (False, True):
        meta = generate(input_ids=[5, 6, 7], return_logprob=True, return_text_in_logprobs=with_text,
                        sampling_params=sampling)["meta_info"]
        assert [t for _, t, _ in meta["output_token_logprobs"]] == exp.token_ids
        assert [x for _, _, x in meta["output_token_logprobs"]] == [
            tok.decode([t], skip_special_tokens=False) if with_text else None for t in exp.token_ids]
        assert "output_top_logprobs" not in meta
    outs = generate(text="Hello", sampling_params={"n": 3, "regex": "[ab]{3}", "max_new_tokens": 8, "seed": 5})
    assert len(outs) == 3 and all(len(o["text"]) == 3 and set(o["text"]) <= {"a", "b"} for o in outs), outs
    schema = {"type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"],
              "additionalProperties": False}
    out = generate(text="Hello", sampling_params={"json_schema": json.dumps(schema), "max_new_tokens": 40,
                                                  "temperature": 0})
    assert json.loads(out["text"])["x"] in ("a", "b"), out
    eos = min(llm.engine.eos_ids)
    forced = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {str(eos): 100}}
    assert generate(input_ids=[5, 6], sampling_params=forced)["text"] == ""
    kept = generate(input_ids=[5, 6], sampling_params={**forced, "skip_special_tokens": False})
    assert kept["output_ids"] == [eos] * 3 and kept["text"] == tok.decode([eos] * 3, skip_special_tokens=False) != ""


def test_log_requests(server: ServerProcess) -> None:
    """--log-requests (level 3): a line when the request is accepted (DP rank, prompt tokens, the sampling fields
    sent, the prompt) and one when it ends (reason, tokens, the whole output); a refused request's reason."""
    r = httpx.post(f"{server.url}/generate", json={"text": "Hello there", "rid": "logged-1", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}, timeout=60).json()
    bad = httpx.post(f"{server.url}/generate", json={"input_ids": [10 ** 6], "rid": "logged-2"}, timeout=60)
    assert bad.status_code == 400
    lines: list[str] = []
    for _ in range(100):  # the lines are written as the requests end: at most 10 s after
        lines = [line for line in server.log().splitlines() if "request logged-" in line]
        if len(lines) >= 3:
            break
        time.sleep(0.1)
    accepted, finished, refused = (next(line for line in lines if key in line) for key in (
        "request logged-1 accepted", "request logged-1 finished", "request logged-2 failed"))
    assert "on DP rank 0: " in accepted and f"{r['meta_info']['prompt_tokens']} prompt tokens" in accepted
    assert "'max_tokens': 4" in accepted and "'temperature': 0.0" in accepted and "Hello there" in accepted
    assert "finished: length after" in finished and "4 completion tokens" in finished
    assert f"output {r['text']!r}" in finished
    assert "refused (400)" in refused and "vocabulary" in refused


def test_log_request_levels(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    """Level 0 holds no sampling fields and no text; 1 adds the fields; 2 clips prompt and output to their ends
    (CLIP characters each), decoding only the prompt's end tokens."""
    from dsaserve.engine.request import FinishReason
    from dsaserve.server.request_log import CLIP, RequestLog
    tok, params = llm.tokenizer, SamplingParams(max_tokens=7, top_p=0.5)
    prompt = tok.encode("word " * 3 * CLIP)
    caplog.set_level("INFO", logger="dsaserve.requests")
    for level in (0, 1, 2):
        RequestLog(level).accepted(f"r{level}", 1, prompt, params, tok)
        RequestLog(level).finished(f"r{level}", FinishReason("stop"), len(prompt), 7, 2, time.monotonic(), "x" * 900)
    logged = {r.getMessage().split()[1] + r.getMessage().split()[2]: r.getMessage() for r in caplog.records}
    assert logged["r0accepted"] == f"request r0 accepted on DP rank 1: {len(prompt)} prompt tokens"
    assert "sampling" not in logged["r0accepted"] and "output" not in logged["r0finished:"]
    assert logged["r1accepted"].endswith("sampling {'max_tokens': 7, 'top_p': 0.5}")
    assert f"...[{len(prompt) - 2 * CLIP} tokens]..." in logged["r2accepted"]
    assert f"output '{'x' * CLIP} ...[{900 - 2 * CLIP} characters]... {'x' * CLIP}'" in logged["r2finished:"]
    assert "(2 cached)" in logged["r2finished:"]


def test_flush_cache_empties_the_prefix_cache(server: ServerProcess) -> None:
    """SGLang's /flush_cache (it was a 404): a repeated prompt hits the prefix cache, and after a flush it does not."""
    def cached() -> int:
        r = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": list(range(40, 53)),
                                                                   "sampling_params": {"max_new_tokens": 1}})
        return r.json()["meta_info"]["cached_tokens"]
    cached()
    assert cached() == 12  # three whole pages of four
    assert httpx.post(f"{server.url}/flush_cache", timeout=60).status_code == 200
    assert cached() == 0


def test_get_load_counts_a_running_request(server: ServerProcess) -> None:
    """SGLang's /get_load (sglang-router's load-aware policies poll it; it was a 404): an idle server holds nothing;
    a running request counts once with the pages it holds; once aborted, nothing again."""
    def load() -> list[dict]:
        return httpx.get(f"{server.url}/get_load", timeout=30).json()

    def until(check, what: str) -> list[dict]:
        for _ in range(600):  # bounded: 60 s
            got = load()
            if check(got[0]):
                return got
            time.sleep(0.1)
        raise AssertionError(f"{what}: {got}")
    idle = {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    until(lambda x: x == idle, "idle")
    body = {"rid": "load-1", "input_ids": list(range(60, 73)), "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()  # (kept: a dropped iterator closes the stream, and the server aborts the request)
        next(lines)  # running: its first tokens are out
        running = until(lambda x: x["num_reqs"] == 1, "running")[0]
        assert running["num_waiting_reqs"] == 0 and running["num_tokens"] >= 16 and running["num_tokens"] % 4 == 0
        assert httpx.post(f"{server.url}/abort_request", json={"rid": "load-1"}, timeout=30).status_code == 200
    until(lambda x: x == idle, "after the abort")


def test_queued_requests_count_their_tokens_in_the_load(tiny_ds: str) -> None:
    """/get_load's num_tokens counts the queued requests' tokens (EngineStats.queued_tokens), as SGLang's does."""
    llm = LLM(tiny_ds, **FLAGS, max_running_requests=1)
    first, second = list(range(40, 53)), list(range(60, 93))
    for rid, ids in (("a", first), ("b", second)):
        llm.engine.add_request(rid, ids, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    llm.engine.step()
    stats = llm.engine.stats()
    assert (stats.running, stats.waiting, stats.queued_tokens) == (1, 1, len(second))
    assert llm.engine.abort("a") and llm.engine.abort("b")
