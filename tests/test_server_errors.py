"""Every error case gets its status and a message naming the problem; the server serves the next request."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from server_process import ServerProcess, module_server

pytestmark = pytest.mark.timeout(180)
KEY = "sekret"
FLAGS = dict(page_size=4, max_total_tokens=4096, context_length=128, api_key=KEY,
             max_running_requests=1, max_queued_requests=1)


@pytest.fixture(scope="module")
def server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(tiny_ds, tmp_path_factory, **FLAGS)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    """(Python's JSON, which writes an infinity as `Infinity`, as Python's parser reads it; httpx refuses one.)"""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def assert_serves(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3




def ref_chain(n: int) -> dict:
    """A JSON schema whose $ref chain is n schemas deep."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{n}": {"type": "string"}}}


# llguidance compiles these recursively: before their limits, each overflowed the stack and killed the server (SIGSEGV)
CHAIN_TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"p": {"$ref": "#/$defs/d0"}}, "$defs": ref_chain(3000)["$defs"]}}}
DEEP = [
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ref_chain(
        3000)}}}, 400, "the JSON schema nests more than 1024 levels deep (counting through $ref)"),
    ("/v1/completions", {"ebnf": "root ::= r0\n" + "".join(f'r{i} ::= "x" r{i + 1} | "y"\n' for i in range(3000))},
     400, "the grammar defines 3001 rules, more than the 1000 this server compiles"),
    ("/v1/chat/completions", {"tools": [CHAIN_TOOL], "tool_choice": "required"}, 400, "nests more than 1024 levels"),
]
BAD = [  # (path, body changes, status, words in the message)
    ("/v1/completions", {"prompt": [7] * 200}, 400, "200 tokens but this model's maximum context length is 128"),
    ("/v1/completions", {"prompt": [7] * 100, "max_tokens": 40}, 400, "max_tokens (40) + the prompt (100 tokens)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 150}]}, 400, "context length"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 400, "prompt is empty"),
    ("/v1/completions", {"temperature": -1}, 400, "temperature must be >= 0"),
    ("/v1/completions", {"top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/chat/completions", {"max_tokens": 0}, 400, "max_tokens must be > 0"),
    ("/generate", {"model": None, "input_ids": [5], "sampling_params": {"max_new_tokens": -1}}, 400,
     "max_new_tokens must be > 0"),
    ("/v1/completions", {"max_tokens": -1}, 400, "max_tokens must be > 0"),
    ("/v1/completions", {"n": 0}, 400, "n"),
    ("/v1/completions", {"logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "token id 99999, outside the vocabulary"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, 400, "token id 99999 is outside the vocabulary"),
    ("/v1/completions", {"logit_bias": {"the": 1}}, 400, "logit_bias keys must be token ids, got 'the'"),
    ("/v1/completions", {"repetition_penalty": 0}, 400, "repetition_penalty must be in (0, 2]"),
    ("/v1/completions", {"suffix": "def f():"}, 400,
     "suffix: Value error, fill-in-the-middle (a suffix) is not supported"),
    ("/v1/completions", {"best_of": 3}, 400, "best_of must equal n (1): candidates are not ranked, got 3"),
    ("/generate", {"model": None, "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 5}},
     400, "min_new_tokens must be in [0, max_tokens]"),
    ("/v1/completions", {"routed_dp_rank": 3}, 400, "routed_dp_rank must be in [0, 1)"),
    ("/v1/completions", {"stop": [""]}, 400, "stop strings must be non-empty"),
    ("/v1/completions", {"temperature": float("inf")}, 400, "temperature must be >= 0 and finite"),
    # JSON numbers only, as OpenAI's API (lax pydantic took "0.5", true as 1 and 2.0 as 2)
    ("/v1/completions", {"temperature": "0.5"}, 400, "temperature: Input should be a valid number"),
    ("/v1/chat/completions", {"max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
    ("/v1/chat/completions", {"n": 2.0}, 400, "n: Input should be a valid integer"),
    ("/v1/completions", {"logprobs": True}, 400, "logprobs: Input should be a valid integer"),
    ("/v1/completions", {"logit_bias": {"5": "1"}}, 400, "logit_bias.5: Input should be a valid number"),
    ("/v1/completions", {"prompt": "x" * 200_000}, 400, "the prompt has 200000 characters, more than the context length"),
    ("/v1/completions", {"prompt": ["x" * 200_000]}, 400, "200000 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]}, 400, "200000 characters"),
    ("/generate", {"model": None, "text": "x" * 200_000}, 400, "200000 characters"),
    ("/v1/completions", {"n": 2}, 400, "asks for 2 completions (1 prompt(s) x n = 2) and the server queues at most 1"),
    ("/v1/completions", {"prompt": [[5, 6], [7]]}, 400, "asks for 2 completions (2 prompt(s) x n = 1)"),
    ("/v1/chat/completions", {"n": 2}, 400, "asks for 2 completions"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, 400, "stream_options needs stream: true"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "content[0]: parts of type 'image_url' are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "content[0]: a text part needs its text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "a user message needs content"),
    ("/generate", {"model": None, "text": ["a", "b"]}, 400, "asks for 2 completions (2 prompt(s) x n = 1)"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"n": 2}}, 400, "asks for 2 completions"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"json_schema": "{"}}, 400,
     "json_schema is not valid JSON"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"json_schema": "[" * 10_000 + "]" * 10_000}}, 400,
     "json_schema nests too deeply to parse"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"json_schema": "5"}}, 400,
     "json_schema must be a JSON schema: an object"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"json_schema": "{}", "regex": "a"}}, 400,
     "give at most one of regex, json_schema and ebnf"),
    ("/generate", {"model": None, "text": ["a"], "rid": ["x"], "sampling_params": {"n": 2}}, 400,
     "with n > 1 a single rid names the whole call"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/completions", {"model": "gpt-17"}, 404, "'gpt-17' does not exist"),
    ("/generate", {"model": None, "sampling_params": {"max_new_tokens": 2, "temprature": 0.5}}, 400, "temprature"),
    ("/generate", {"model": None, "input_ids": [5], "sampling_params": {"max_new_tokens": 0, "min_new_tokens": 1}},
     400, "max_new_tokens 0 scores the prompt only: min_new_tokens must be 0"),
    ("/generate", {"model": None, "sampling_params": {"max_new_tokens": 2}}, 400, "exactly one of text and input_ids"),
    # booleans are strict, as OpenAI's API is: lax pydantic read "no" as false and 1 as true
    ("/v1/chat/completions", {"parallel_tool_calls": "no"}, 400,
     "parallel_tool_calls: Input should be a valid boolean"),
    ("/v1/chat/completions", {"stream": "false"}, 400, "stream: Input should be a valid boolean"),
    ("/v1/chat/completions", {"logprobs": 1}, 400, "logprobs: Input should be a valid boolean"),
    ("/v1/completions", {"echo": "yes"}, 400, "echo: Input should be a valid boolean"),
    ("/generate", {"model": None, "text": "a", "stream": "no"}, 400, "stream: Input should be a valid boolean"),
]


@pytest.mark.parametrize("path,changes,status,words", BAD + DEEP)
def test_bad_request(server: ServerProcess, client: openai.OpenAI, model: str, path: str, changes: dict,
                     status: int, words: str) -> None:
    body = {"model": model, "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": [5, 6]})
    body.update(changes)
    r = post(server, path, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "code" in err and "param" in err
    if "valid boolean" in words:
        assert err["param"] == words.split(":")[0], err
    assert_serves(client, model)


def test_a_body_that_is_not_json_is_named_so(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": ', timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["message"].startswith("the body is not valid JSON (at character")
    assert err["param"] is None, err
    assert_serves(client, model)


def test_engine_refusals_carry_openai_codes(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    """A prompt past the context length is OpenAI's context_length_exceeded, however the engine found it."""
    for body in ({"prompt": [7] * 200}, {"prompt": [7] * 100, "max_tokens": 40}):
        err = post(server, "/v1/completions", {"model": model, "max_tokens": 4, **body}).json()["error"]
        assert err["code"] == "context_length_exceeded", err
    assert post(server, "/v1/completions", {"model": model, "prompt": [5, 99999]}).json()["error"]["code"] == \
        "invalid_value"
    assert_serves(client, model)


def test_openai_client_raises_typed_errors(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="context length is 128"):
        client.completions.create(model=model, prompt=[7] * 130, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=model, prompt=[7] * 130, max_tokens=2, stream=True)
    assert_serves(client, model)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_past_the_context_names_the_field_that_held_it(client: openai.OpenAI, model: str,
                                                                stream: bool) -> None:
    """The engine's refusal of the prompt itself named no field (param null): now the one the client sent."""
    with pytest.raises(openai.BadRequestError,
                       match="the prompt has 130 tokens but this model's maximum context length is 128 tokens") as err:
        client.completions.create(model=model, prompt=[7] * 130, max_tokens=2, stream=stream)
    assert (err.value.param, err.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError,
                       match=r"the prompt has \d+ tokens but this model's maximum context length") as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi " * 150}],
                                       max_tokens=2, stream=stream)
    assert (err.value.param, err.value.code) == ("messages", "context_length_exceeded")


def test_api_key(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"model": model, "prompt": "hi"}, key=key)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # health checks need no key
    assert httpx.get(f"{server.url}/get_server_info").status_code == 401
    info = httpx.get(f"{server.url}/get_server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["api_key"] == "<redacted>"
    for path in ("/docs", "/redoc", "/openapi.json"):  # the API's schema is not published without a key (200 before)
        assert httpx.get(f"{server.url}{path}").status_code == 404, path
    assert_serves(client, model)


def test_queue_full_is_503(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    """One running (max_running_requests=1), one waiting (max_queued_requests=1): the third gets 503, but a
    request that could never run gets its 400 (context_length_exceeded), not a 503 a client would retry."""
    started = [threading.Event(), threading.Event()]
    stop = threading.Event()

    def hold(i: int) -> None:
        stream = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=120, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        started[i].set()  # the request was accepted (headers arrived)
        for _ in stream:
            if stop.is_set():
                break
        stream.close()

    threads = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(2)]
    threads[0].start()
    assert started[0].wait(30)
    threads[1].start()
    assert started[1].wait(30)
    try:
        r = post(server, "/v1/completions", {"model": model, "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
        never = post(server, "/v1/completions", {"model": model, "prompt": [7] * 200, "max_tokens": 2})
        assert never.status_code == 400 and never.json()["error"]["code"] == "context_length_exceeded", never.text
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    deadline = time.monotonic() + 30
    while server.server_info(KEY)["internal_states"][0]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_serves(client, model)


@pytest.mark.parametrize("path,changes,param,words", [
    ("/v1/completions", {"temperature": -1}, "temperature", "temperature must be >= 0"),
    ("/v1/completions", {"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
    ("/v1/chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens must be > 0"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens",
     "max_new_tokens must be > 0"),
    # /tokenize and /detokenize take the completions' size limit (a 9 MB prompt held a tokenizer thread 9 s)
    ("/tokenize", {"prompt": "x" * 200_000}, "prompt", "the prompt has 200000 characters, more than the context"),
    ("/v1/tokenize", {"prompt": None, "messages": [{"role": "user", "content": "x" * 200_000}]}, "messages",
     "the prompt has 200000 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]}, "messages",
     "the prompt has 200000 characters"),
    ("/detokenize", {"prompt": None, "tokens": [5] * 200}, "tokens", "tokens holds 200 ids, more than the context"),
    # the sampler hashes seeds mod 2^64: a wider one was taken and silently drew another seed's tokens
    ("/v1/completions", {"seed": 2 ** 64 + 5}, "seed", "seed must be a signed 64-bit integer, in [-922337203685477580"),
    ("/v1/chat/completions", {"seed": -2 ** 63 - 1}, "seed", "seed must be a signed 64-bit integer"),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"seed": 2 ** 63}}, "seed", "seed must be a signed"),
    # the engine's refusal of prompt + max tokens past the context names the field sent (max_tokens, no param, was)
    ("/v1/chat/completions", {"max_completion_tokens": 500}, "max_completion_tokens",
     "max_completion_tokens (500) + the prompt ("),
    ("/v1/chat/completions", {"max_tokens": 500}, "max_tokens", "max_tokens (500) + the prompt ("),
    ("/v1/completions", {"prompt": [7] * 100, "max_tokens": 40}, "max_tokens", "max_tokens (40) + the prompt (100 "),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"max_new_tokens": 500}}, "max_new_tokens",
     "max_new_tokens (500) + the prompt ("),
    # the engine's refusal of the prompt itself names the field that held it (no param, was)
    ("/generate", {"model": None, "input_ids": [7] * 130}, "input_ids",
     "the prompt has 130 tokens but this model's maximum context"),
    ("/generate", {"model": None, "text": "hi " * 150}, "text", "the prompt has "),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias", "logit_bias token id 99999 is outside the vocab"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt", "the prompt has token id 99999, outside the vocabulary"),
    ("/generate", {"model": None, "input_ids": [5, 99999]}, "input_ids", "the prompt has token id 99999, outside the"),
    # int() read these as token ids (1_0 as 10); a key is the id in plain decimal digits
    *[("/v1/completions", {"logit_bias": {key: 5}}, "logit_bias", f"logit_bias keys must be token ids, got {key!r}")
      for key in ("1_0", " 7", "+7", "\u0663", "7\n")],
    ("/generate", {"model": None, "text": "a", "sampling_params": {"logit_bias": {"1_0": 5}}}, "logit_bias",
     "logit_bias keys must be token ids, got '1_0' (an id in plain decimal digits)"),
    # llguidance fails a forced call among more than 2000 tools mid-reply: refused before anything is queued
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(3000)],
                              "tool_choice": "required"}, "tools", "tools holds 3000 functions and tool_choice "),
    ("/generate", {"model": None, "text": "a", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True,
                   "logprob_start_len": -2}, "logprob_start_len", "logprob_start_len: Input should be greater than or "
                                                                   "equal to -1"),
    # past the prompt's end it answered an empty list (SGLang's: a 400)
    ("/generate", {"model": None, "input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 4},
     "logprob_start_len", "logprob_start_len (4) is past the end of the prompt (3 tokens): it can be at most 3"),
    # max tokens 0 scores the prompt only: both fields as sent (the message said "min tokens")
    ("/generate", {"model": None, "input_ids": [5], "sampling_params": {"max_new_tokens": 0, "min_new_tokens": 3}},
     "max_new_tokens", "max_new_tokens 0 scores the prompt only: min_new_tokens must be 0, got 3"),
    ("/v1/completions", {"max_tokens": 0, "min_tokens": 3}, "max_tokens",
     "max_tokens 0 scores the prompt only: min_tokens must be 0, got 3"),
    # rules between two fields name the one that breaks them (param was null: the rule was the body's)
    ("/v1/completions", {"best_of": 3}, "best_of", "best_of: Value error, best_of must equal n (1)"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: Value error, stream_options needs stream: true"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "top_logprobs: Value error, top_logprobs needs"),
])
def test_sampling_errors_name_the_field_the_client_sent(server: ServerProcess, model: str, path: str, changes: dict,
                                                       param: str, words: str) -> None:
    """`param` names the field (it was null), as the client spelt it (max_completion_tokens was called max_tokens)."""
    body = {"model": model, "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": [5, 6]})
    body.update(changes)
    err = post(server, path, {k: v for k, v in body.items() if v is not None}).json()["error"]
    assert (err["param"], err["message"].startswith(words)) == (param, True), err


def test_logprob_start_len_at_the_prompts_end_scores_none_of_it(server: ServerProcess) -> None:
    """SGLang's: a start at the prompt's end asks for none of its log-probabilities (clients scoring only the output
    send it), a start before it for those from there on."""
    def prompt_logprobs(start: int) -> list:
        body = {"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": start,
                "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        r = post(server, "/generate", body)
        assert r.status_code == 200 and len(r.json()["meta_info"]["output_token_logprobs"]) == 2, r.text
        return r.json()["meta_info"]["input_token_logprobs"]
    assert prompt_logprobs(3) == [] and [e[1] for e in prompt_logprobs(2)] == [7]


def test_a_body_without_a_json_content_type_is_named_so(server: ServerProcess) -> None:
    """curl -d sends a form's content type, which FastAPI does not parse as JSON: the 400 says what to send."""
    r = httpx.post(f"{server.url}/generate", content=b'{"text": "a"}', timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text


def test_the_bearer_scheme_is_case_insensitive(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5], "max_tokens": 1}, timeout=60,
                   headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200, r.text
