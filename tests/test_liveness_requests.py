"""Requests against a live single-rank server: size limit (413 before parsing), tokenization that
does not stall the event loop, text that is not valid Unicode, bodies that do not decode, aborting
by the id the client saw, and requests that arrive just after the rank process died."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from server_process import ServerProcess, descendants, module_server

pytestmark = pytest.mark.timeout(300)
LIMIT = 12_000_000
FLAGS = dict(page_size=4, max_total_tokens=4096, max_request_bytes=LIMIT)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(tiny_ds, tmp_path_factory, **FLAGS)


def post(server: ServerProcess, path: str, content: bytes | object, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, headers=JSON, timeout=timeout)


def error_of(r: httpx.Response) -> dict:
    err = r.json()["error"]  # OpenAI-shaped, whatever went wrong
    assert err["message"] and err["type"], err
    return err


def assert_serves(server: ServerProcess, model: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": [5, 6], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_body_over_the_limit_is_413_before_parsing(server: ServerProcess, model: str) -> None:
    # Valid JSON that would be tokenized (and refused with 400) if it were parsed.
    big = json.dumps({"model": model, "prompt": "a " * (LIMIT // 2 + 1000)}).encode()
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and "--max-request-bytes" in error_of(r)["message"]

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(LIMIT // 1_000_000 + 1):
            yield b"x" * 1_000_000

    r = post(server, "/v1/completions", chunks())
    assert r.status_code == 413 and "--max-request-bytes" in error_of(r)["message"]
    assert_serves(server, model)


def test_tokenizing_a_huge_prompt_leaves_the_server_responsive(server: ServerProcess, model: str) -> None:
    """4 MB of text takes seconds to tokenize: /health answers meanwhile. As one prompt (completions, chat or
    /tokenize) it is a 400 at once: more characters than the context length could hold; as 80 prompts each
    under that bound it is tokenized (in one tokenizer call), then refused by the engine (each is too long)."""
    text = "hello world " * 350_000
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
                       ("/tokenize", {"prompt": text})):
        r = post(server, path, json.dumps({"model": model, **body}).encode())
        assert r.status_code == 400 and "characters, more than the context length" in error_of(r)["message"]
    body = json.dumps({"model": model, "prompt": [text[:52_000]] * 80, "max_tokens": 2}).encode()
    result: list[httpx.Response] = []
    big = threading.Thread(target=lambda: result.append(post(server, "/v1/completions", body, timeout=120)))
    big.start()
    answered_meanwhile = 0
    while big.is_alive():
        if httpx.get(f"{server.url}/health", timeout=30).status_code == 200 and big.is_alive():
            answered_meanwhile += 1
        time.sleep(0.1)
    big.join()
    assert result[0].status_code == 400 and "context length" in error_of(result[0])["message"], result[0].text[:300]
    assert answered_meanwhile >= 3, "the health check waited for the tokenizer"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}),
    ("/generate", {"text": "a\ud800b", "sampling_params": {"max_new_tokens": 2}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2}),
    # escapes inside JSON that a string field holds: decoded a second time (each was a 500)
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "json_schema": '{"const": "\\ud800"}'}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\udc00"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "r"}], "max_tokens": 2}),
])
def test_lone_surrogate_is_a_json_400(server: ServerProcess, model: str, path: str, body: dict) -> None:
    r = post(server, path, json.dumps({"model": model, **body}))  # json.dumps writes it as \ud800
    assert r.status_code == 400 and "surrogate" in error_of(r)["message"], r.text
    assert_serves(server, model)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00\x01", b'{"model": "m", "prompt": "\xff\xfe"}',
                                     b"[1, 2, 3]", b""])
def test_undecodable_bodies_get_json_errors(server: ServerProcess, model: str, content: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/generate", "/abort_request"):
        r = post(server, path, content)
        assert r.status_code == 400, (path, r.status_code, r.text)
        error_of(r)
    assert_serves(server, model)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_abort_request_takes_the_response_id(server: ServerProcess, model: str, kind: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    extra = {"max_tokens": 1000, "n": 2, "stream": True, "extra_body": {"ignore_eos": True}}
    if kind == "chat":
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **extra)
    else:
        stream = client.completions.create(model=model, prompt=[5, 6, 7], **extra)
    chunks = iter(stream)
    response_id = next(chunks).id  # the id the client sees; the engine runs one request per choice
    r = httpx.post(f"{server.url}/abort_request", json={"rid": response_id}, timeout=10)
    assert r.status_code == 200, r.text
    finishes = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finishes == {0: "abort", 1: "abort"}
    assert httpx.post(f"{server.url}/abort_request", json={"rid": response_id}, timeout=10).status_code == 404
    assert_serves(server, model)


def test_a_clients_rid_names_its_request_and_abort_all_ends_every_one(server: ServerProcess, model: str) -> None:
    """SGLang's `rid` on the OpenAI routes: the response carries it, /abort_request takes it, a second request
    may not reuse it while the first runs (nor a /generate request: a disconnect of that one would abort the call);
    `abort_all` ends every running request."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    long = {"max_tokens": 1000, "stream": True}
    chat = iter(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               extra_body={"ignore_eos": True, "rid": "my-chat-1"}, **long))
    assert next(chat).id == "my-chat-1"
    other = iter(client.completions.create(model=model, prompt=[5, 6, 7], extra_body={"ignore_eos": True,
                                                                                      "rid": "my-cmpl-2"}, **long))
    assert next(other).id == "my-cmpl-2"
    with pytest.raises(openai.BadRequestError, match="request id 'my-chat-1' is already in use"):
        client.completions.create(model=model, prompt=[5, 6], max_tokens=2, extra_body={"rid": "my-chat-1"})
    # nor /generate: the call's one request runs as my-chat-1-0, but /abort_request and a disconnect name the call
    r = httpx.post(f"{server.url}/generate", json={"rid": "my-chat-1", "input_ids": [5, 6],
                                                  "sampling_params": {"max_new_tokens": 2}}, timeout=10)
    assert r.status_code == 400 and "request id 'my-chat-1' is already in use" in r.text, r.text
    assert httpx.post(f"{server.url}/abort_request", json={"rid": "my-chat-1"}, timeout=10).status_code == 200
    assert [c.finish_reason for chunk in chat for c in chunk.choices if c.finish_reason] == ["abort"]
    r = httpx.post(f"{server.url}/abort_request", json={"abort_all": True}, timeout=10)
    assert r.status_code == 200 and r.json()["aborted"] == 1, r.text
    assert [c.finish_reason for chunk in other for c in chunk.choices if c.finish_reason] == ["abort"]
    assert httpx.post(f"{server.url}/abort_request", json={}, timeout=10).status_code == 400  # neither
    assert_serves(server, model)


def test_requests_just_after_the_rank_died_get_503_at_once(server: ServerProcess, model: str) -> None:
    """Last in this module: it takes the server's only rank down."""
    [rank] = [pid for pid in descendants(server.proc.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
    os.kill(rank, signal.SIGKILL)
    time.sleep(0.05)
    for _ in range(6):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": [5, 6], "max_tokens": 2},
                       timeout=5)  # a hang fails here
        assert r.status_code == 503 and "rank 0" in error_of(r)["message"], r.text
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    assert server.stop() == 0
