"""The HTTP server with the official openai client: same greedy tokens as LLM.generate, streaming and
not, sync and async; n / seed, stop strings, usage, 64 concurrent streams. SGLang's native and info routes:
test_server_native.py."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from dsaserve import LLM, SamplingParams
from server_process import ServerProcess, module_server

pytestmark = pytest.mark.timeout(180)
FLAGS = dict(page_size=4, max_total_tokens=4096)
PROMPTS = ["Hello world", "The quick brown fox", "Tell me a story about a robot"]
AS_IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}
MAX = 10


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.fixture(scope="module")
def server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(tiny_ds, tmp_path_factory, **FLAGS)


@pytest.fixture(scope="module")
def llm(tiny_ds: str) -> LLM:
    return LLM(tiny_ds, **FLAGS)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(llm: LLM, prompts: list, **kw) -> list:
    return llm.generate(prompts, SamplingParams(max_tokens=MAX, temperature=0.0, ignore_eos=True, **kw))


def test_ready_line_printed_once(server: ServerProcess, model: str) -> None:
    assert server.ready_lines() == [f"dsaserve ready on {server.url} (model {model})"]


def test_completions_match_llm(client: openai.OpenAI, llm: LLM, model: str) -> None:
    for prompt, exp in zip(PROMPTS, greedy(llm, PROMPTS, logprobs=2)):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX, temperature=0, logprobs=2,
                                      extra_body=AS_IDS)
        c = r.choices[0]
        assert ids_of(c.logprobs.tokens) == exp.token_ids and c.text == exp.text
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
        assert c.logprobs.token_logprobs[0] == pytest.approx(exp.logprobs[0][0], abs=1e-4)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (exp.prompt_tokens, MAX)
        assert r.usage.total_tokens == exp.prompt_tokens + MAX and c.finish_reason == "length"

        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=MAX, temperature=0,
                                                logprobs=0, stream=True, stream_options={"include_usage": True},
                                                extra_body=AS_IDS))
        body = [ch.choices[0] for ch in chunks if ch.choices]
        assert ids_of([t for ch in body for t in ch.logprobs.tokens]) == exp.token_ids
        assert "".join(ch.text for ch in body) == exp.text and body[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == MAX and chunks[-1].usage.prompt_tokens == exp.prompt_tokens


def test_completion_with_no_new_tokens_scores_the_prompt(client: openai.OpenAI, model: str) -> None:
    """Legacy OpenAI completions: max_tokens 0 with echo and logprobs returns the prompt and its log-probabilities
    only (what evaluation harnesses ask for), equal to a generating run's; it was a 400."""
    kw = dict(model=model, prompt="The quick brown fox", temperature=0, echo=True, logprobs=1, extra_body=AS_IDS)
    generating = client.completions.create(max_tokens=2, **kw)
    scored = client.completions.create(max_tokens=0, **kw)
    n = scored.usage.prompt_tokens
    assert (scored.choices[0].text, scored.usage.completion_tokens) == ("The quick brown fox", 0)
    assert scored.choices[0].finish_reason == "length" and len(scored.choices[0].logprobs.tokens) == n
    assert scored.choices[0].logprobs.token_logprobs == generating.choices[0].logprobs.token_logprobs[:n]
    streamed = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "The quick brown fox"


def test_completion_top_logprobs_hold_the_chosen_token(client: openai.OpenAI, model: str) -> None:
    """OpenAI's completions: each top_logprobs entry holds the chosen token's log-probability too (echoed prompt
    tokens, which are rarely the model's top choice, and logprobs=0); it was left out."""
    r = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=3, temperature=0, echo=True,
                                  logprobs=0, extra_body=AS_IDS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) > 4 and lp.top_logprobs[0] is None
    for token, chosen, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top == {token: chosen}


def test_token_id_prompts_and_prompt_lists(client: openai.OpenAI, llm: LLM, model: str) -> None:
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    expected = greedy(llm, prompts)
    r = client.completions.create(model=model, prompt=prompts, max_tokens=MAX, temperature=0, logprobs=0,
                                  extra_body=AS_IDS)
    assert [ids_of(c.logprobs.tokens) for c in sorted(r.choices, key=lambda c: c.index)] == \
        [e.token_ids for e in expected]
    assert r.usage.prompt_tokens == 8 and r.usage.completion_tokens == 2 * MAX


def test_chat_sync_matches_llm(client: openai.OpenAI, llm: LLM, model: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    exp = greedy(llm, [llm.tokenizer.chat(messages)])[0]
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=MAX, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=AS_IDS)
    c = r.choices[0]
    assert ids_of([t.token for t in c.logprobs.content]) == exp.token_ids
    assert c.message.content == exp.text and c.message.role == "assistant"
    assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
    assert r.usage.prompt_tokens == exp.prompt_tokens and r.usage.completion_tokens == MAX


def test_async_streaming_matches_llm(server: ServerProcess, llm: LLM, model: str) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    exp_chat = greedy(llm, [llm.tokenizer.chat(messages)])[0]
    exp_cmpl = greedy(llm, PROMPTS)

    async def chat(client: openai.AsyncOpenAI) -> tuple[str, list[int], int]:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX, temperature=0, logprobs=True, stream=True,
            stream_options={"include_usage": True}, extra_body=AS_IDS)
        text, ids, usage = "", [], 0
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                ids += ids_of([t.token for t in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])])
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, ids, usage

    async def cmpl(client: openai.AsyncOpenAI, prompt: str) -> str:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def main() -> tuple:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(chat(client), *(cmpl(client, p) for p in PROMPTS))

    (text, ids, usage), *texts = asyncio.run(main())
    assert (text, ids, usage) == (exp_chat.text, exp_chat.token_ids, MAX)
    assert texts == [e.text for e in exp_cmpl]


def test_n_with_seed_and_stop(server: ServerProcess, client: openai.OpenAI, llm: LLM, model: str) -> None:
    for seed, seeds in ((100, (100, 101)), (2 ** 63 - 1, (2 ** 63 - 1, -2 ** 63))):  # (n wraps in the 64-bit range)
        sampled = [llm.generate([[5, 6, 7]], SamplingParams(max_tokens=MAX, temperature=1.0, seed=s,
                                                             ignore_eos=True))[0] for s in seeds]
        r = client.completions.create(model=model, prompt=[5, 6, 7], n=2, seed=seed, max_tokens=MAX,
                                      temperature=1.0, logprobs=0, extra_body=AS_IDS)
        got = [ids_of(c.logprobs.tokens) for c in sorted(r.choices, key=lambda c: c.index)]
        assert got == [s.token_ids for s in sampled]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 2 * MAX

    full = greedy(llm, ["Hello world"])[0].text
    stop = full[3:5]  # a stop string that appears in the greedy text
    exp = llm.generate(["Hello world"], SamplingParams(max_tokens=MAX, temperature=0.0, stop=[stop]))[0]
    kept = llm.generate(["Hello world"], SamplingParams(max_tokens=MAX, temperature=0.0, stop=[stop],
                                                        include_stop_str=True))[0]
    assert kept.text == exp.text + stop
    for stream, keep in ((False, False), (True, False), (False, True), (True, True)):
        r = client.completions.create(model=model, prompt="Hello world", max_tokens=MAX, temperature=0,
                                      stop=[stop], stream=stream, extra_body={"include_stop_str_in_output": keep})
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == (kept.text if keep else exp.text) and (stop in text) == keep
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert [c.choices[0].matched_stop for c in chunks if c.choices][-1] == stop  # SGLang's field
    messages = [{"role": "user", "content": "Hello world"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX, temperature=0)
    chat_stop = reply.choices[0].message.content[2:4]
    for stream in (False, True):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX, temperature=0,
                                           stop=[chat_stop], stream=stream)
        last = [c.choices[0] for c in r if c.choices][-1] if stream else r.choices[0]
        assert (last.finish_reason, last.matched_stop) == ("stop", chat_stop)
    native = httpx.post(f"{server.url}/generate", timeout=60, json={"text": "Hello world", "sampling_params": {
        "max_new_tokens": MAX, "temperature": 0, "stop": [stop], "no_stop_trim": True}}).json()
    assert native["text"] == kept.text


def test_logit_bias_repetition_penalty_min_tokens(server: ServerProcess, client: openai.OpenAI, llm: LLM,
                                                  model: str) -> None:
    """OpenAI's logit_bias through the official client, vLLM's repetition_penalty and min_tokens in extra_body,
    SGLang's names on /generate: the tokens of LLM with the same SamplingParams."""
    base = greedy(llm, [[5, 6, 7]])[0].token_ids
    shaping = dict(max_tokens=MAX, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
                   logit_bias={str(base[0]): -100.0, "9": 3.0})
    free = llm.generate([[5, 6, 7]], SamplingParams(**shaping))[0].token_ids
    assert free != base
    exp = llm.generate([[5, 6, 7]], SamplingParams(**shaping, min_tokens=3, stop_token_ids=(free[0],)))[0]
    assert len(exp.token_ids) >= 3  # without min_tokens, free[0] would end it after one token
    r = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=MAX, temperature=0, logprobs=0,
                                  logit_bias={str(base[0]): -100, "9": 3},
                                  extra_body={**AS_IDS, "repetition_penalty": 1.5, "min_tokens": 3,
                                              "stop_token_ids": [free[0]]})
    assert ids_of(r.choices[0].logprobs.tokens) == exp.token_ids
    native = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": MAX, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.5,
        "min_new_tokens": 3, "stop_token_ids": [free[0]], "logit_bias": {str(base[0]): -100, "9": 3}}}).json()
    assert native["output_ids"] == exp.token_ids


def test_64_concurrent_streams(server: ServerProcess, model: str) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, int]:
        prompt = [10 + i % 50] * (3 + i % 7)
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=4 + i % 5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        chunks = [ch async for ch in stream]
        usage = chunks[-1].usage
        n_tokens = sum(1 for ch in chunks if ch.choices)
        return usage.prompt_tokens - len(prompt), usage.completion_tokens - (4 + i % 5), n_tokens - (4 + i % 5)

    async def main() -> list:
        limits = httpx.Limits(max_connections=100)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=limits)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(main()) == [(0, 0, 0)] * 64


def test_logprob_bytes_and_text_offsets_follow_multibyte_characters(server: ServerProcess, client: openai.OpenAI,
                                                                    model: str) -> None:
    """Byte-level tokens split characters: a chat logprob's `bytes` are its token's own (they join into the
    content's UTF-8, where each token alone decodes to U+FFFD), and completions' `text_offset` counts characters
    of the text (a token starts where its character does), streamed or not."""
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=20,
                                       temperature=0, logprobs=True, top_logprobs=1, extra_body={"regex": "日本"})
    content, tokens = r.choices[0].message.content, r.choices[0].logprobs.content
    assert content == "日本" and len(tokens) > 2 and "\ufffd" in tokens[0].token
    assert r.choices[0].finish_reason == "stop"  # its last token is the EOS, which the content leaves out
    assert b"".join(bytes(t.bytes) for t in tokens[:-1]) == content.encode()
    prompt = "café au lait, 日本 😀 ok"
    kw = dict(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0,
              extra_body={"ignore_eos": True})
    c = client.completions.create(**kw).choices[0]
    offsets, text = c.logprobs.text_offset, c.text
    assert text.startswith(prompt) and offsets == sorted(offsets) and len(offsets) == len(c.logprobs.tokens)
    for token, start in zip(c.logprobs.tokens, offsets):
        if "\ufffd" in token:  # a piece of a character: it starts there
            assert ord(text[start]) > 127, (token, start)
        else:
            assert text[start:start + len(token)] == token, (token, start, text)
    streamed = client.completions.create(stream=True, **kw)
    assert [o for chunk in streamed for ch in chunk.choices if ch.logprobs for o in ch.logprobs.text_offset] == offsets


def test_null_means_the_default(client: openai.OpenAI, model: str) -> None:
    """The openai client sends a None argument as null, which OpenAI's API takes for its optional fields."""
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0, n=None,
                                          logprobs=None, stream=None)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    done = client.completions.create(model=model, prompt="hi", max_tokens=3, temperature=0, n=None, echo=None,
                                     stream=None)
    assert len(done.choices) == 1 and not done.choices[0].text.startswith("hi")


def test_text_offsets_leave_out_every_token_the_text_skips(tiny_ds: str) -> None:
    """An added token marked special in tokenizer.json (the tiny models' <|system|>, DeepSeek's placeholders)
    is left out of the text by decode(skip_special_tokens=True) although all_special_ids does not list it:
    it must take no room in text_offset either."""
    from dsaserve.engine.tokenizer import CharOffsets, Tokenizer
    tok = Tokenizer(tiny_ds)
    a, b = tok.hf.encode("a", add_special_tokens=False), tok.hf.encode("b", add_special_tokens=False)
    ids = [*a, tok.hf.convert_tokens_to_ids("<|system|>"), *b]
    assert tok.decode(ids) == "ab"
    assert CharOffsets(tok).take(ids) == [0, 1, 1]


def test_openai_extras(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    """The model may be left out or be "default" (SGLang's examples send it; both were refused), streams carry
    each choice's running usage with stream_options.continuous_usage_stats and include_usage (it was ignored),
    and a browser's preflight is allowed (there was no CORS)."""
    for name in (None, "default"):
        body = {"prompt": [5, 6], "max_tokens": 2, **({"model": name} if name else {})}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == model, r.text
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    used = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert used and used == sorted(used) and used[-1] == 5 == chunks[-1].usage.completion_tokens, chunks
    assert len({c.created for c in chunks}) == 1
    two = list(client.completions.create(
        model=model, prompt=[5, 6], max_tokens=3, n=2, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    per_choice = {c.choices[0].index: c.usage.completion_tokens for c in two if c.choices}
    assert per_choice == {0: 3, 1: 3} and two[-1].usage.completion_tokens == 6  # each choice's own count
    alone = client.completions.create(model=model, prompt=[5, 6], max_tokens=3, stream=True,
                                      stream_options={"continuous_usage_stats": True})
    assert all(c.usage is None for c in alone)  # (vLLM's rule: only with include_usage)
    pre = httpx.options(f"{server.url}/v1/chat/completions", timeout=10, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers.get("access-control-allow-origin") in ("*", "http://localhost:3000")


def test_text_offsets_count_the_special_tokens_the_text_shows(client: openai.OpenAI, llm: LLM, model: str,
                                                              tiny_ds: str) -> None:
    """An echoed token-id prompt shows its special tokens (a BOS), and so does the output with skip_special_tokens
    false: each takes its room in text_offset (they took none, and every later offset was that much early)."""
    from dsaserve.engine.tokenizer import Tokenizer
    tok = Tokenizer(tiny_ds)
    special, eos = sorted(tok.special_ids)[0], min(llm.engine.eos_ids)
    prompt = [special, 76, 77]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    widths = [len(tok.decode([t], skip_special_tokens=False)) for t in prompt]
    assert r.choices[0].logprobs.text_offset == [0, widths[0], widths[0] + widths[1]], r.choices[0].logprobs
    r = client.completions.create(model=model, prompt=[5, 6], max_tokens=2, logprobs=0, temperature=0, extra_body={
        "ignore_eos": True, "logit_bias": {str(eos): 100}, "skip_special_tokens": False})
    shown = tok.decode([eos], skip_special_tokens=False)
    assert r.choices[0].text == shown * 2 and r.choices[0].logprobs.text_offset == [0, len(shown)], r.choices[0]
