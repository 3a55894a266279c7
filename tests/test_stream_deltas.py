"""A request's deltas as the routes read them: what waits in its queue comes merged into one event (a consumer
that fell behind catches up at once), in order, and a deployment failure ends the stream after them."""
from __future__ import annotations

import asyncio
import json

import pytest

from dsaserve.engine.request import FinishReason, SamplingParams
from dsaserve.server.handles import Delta, EngineFailure, RequestHandle


def _delta(i: int, finish: FinishReason | None = None) -> Delta:
    return Delta(f"t{i} ", [i], [(-0.5 * i, [])], finish, prompt_tokens=7, completion_tokens=i + 1)


async def _read(handle: RequestHandle, feed: list[Delta | EngineFailure], then: list[Delta]) -> list[Delta]:
    """Queue `feed` before reading; queue `then` one at a time, each after the previous event was read."""
    for item in feed:
        handle.queue.put_nowait(item)
    got, pending = [], list(then)
    async for d in handle.deltas():
        got.append(Delta(**vars(d)))  # a copy: the handle may absorb into the delta it yielded
        if pending:
            handle.queue.put_nowait(pending.pop(0))
    return got


def test_waiting_deltas_come_merged_in_order() -> None:
    async def go() -> list[Delta]:
        handle = RequestHandle("r", 0, None, SamplingParams())  # type: ignore[arg-type]  (no detokenization here)
        return await _read(handle, [_delta(0), _delta(1), _delta(2)], [_delta(3), _delta(4, FinishReason("length"))])
    got = asyncio.run(go())
    assert [d.text for d in got] == ["t0 t1 t2 ", "t3 ", "t4 "]
    assert [d.token_ids for d in got] == [[0, 1, 2], [3], [4]]
    assert got[0].logprobs == [(0.0, []), (-0.5, []), (-1.0, [])] and got[0].completion_tokens == 3
    assert got[-1].finish is not None and got[-1].completion_tokens == 5


def test_a_failure_ends_the_stream_after_the_deltas_before_it() -> None:
    async def go() -> list[str]:
        handle = RequestHandle("r", 0, None, SamplingParams())  # type: ignore[arg-type]
        for item in (_delta(0), _delta(1), EngineFailure("rank 1 died")):
            handle.queue.put_nowait(item)
        seen: list[str] = []
        with pytest.raises(EngineFailure, match="rank 1"):
            async for d in handle.deltas():
                seen.append(d.text)
        return seen
    assert asyncio.run(go()) == ["t0 t1 "]


def test_a_failed_part_of_a_call_aborts_the_others_at_once() -> None:
    """n > 1 / batch calls: the second part's error is the answer as soon as it comes, while the first still runs
    (it used to be read only after the first ended), and the parts still running are aborted."""
    from dsaserve.server.errors import ApiError
    from dsaserve.server.metrics import ServerMetrics
    from dsaserve.server.streaming import collect_all

    async def go() -> tuple[list[str], bool]:
        handles = [RequestHandle(f"r{i}", 0, None, SamplingParams()) for i in range(3)]  # type: ignore[arg-type]
        metrics = ServerMetrics()
        handles[0].on_output(_delta(0), metrics)  # running: no finish yet
        handles[1].on_output(_delta(0, FinishReason("error", message="the output constraint failed: x",
                                                    status=400)), metrics)
        aborted: list[str] = []
        with pytest.raises(ApiError, match="the output constraint failed") as err:
            await asyncio.wait_for(collect_all(handles, lambda: aborted.extend(
                h.rid for h in handles if not h.finished)), 5)
        return aborted, err.value.status == 400
    aborted, client_error = asyncio.run(go())
    assert aborted == ["r0", "r2"] and client_error


@pytest.mark.parametrize("route", ["completion", "chat", "generate"])
def test_the_tokens_merged_before_an_error_reach_the_client(route: str) -> None:
    """A consumer that fell behind reads the steps before an error finish merged into its delta: their text is sent
    (it was dropped with the error), then the error event and [DONE]."""
    from types import SimpleNamespace

    from dsaserve.server import native_protocol as native
    from dsaserve.server import protocol as p
    from dsaserve.server.native_routes import generate_stream
    from dsaserve.server.openai_api import Call, OpenAIServing

    error = FinishReason("error", message="the output constraint failed: x", status=400)
    serving = OpenAIServing(SimpleNamespace(tokenizer=None), "m", None)  # type: ignore[arg-type]

    async def go() -> list[str]:
        handle = RequestHandle("r", 0, None, SamplingParams())  # type: ignore[arg-type]
        for d in (_delta(0), _delta(1), _delta(2, error)):  # all waiting: one merged delta
            handle.queue.put_nowait(d)
        if route == "generate":
            stream = generate_stream(serving, [handle], native.GenerateRequest(input_ids=[5], stream=True), [[5]],
                                     False, False)
        else:
            body = (p.CompletionRequest(prompt=[5], stream=True) if route == "completion" else
                    p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stream=True))
            stream = serving._stream(Call("c", body, [[5]], [handle], route, None, None), [None])
        return [chunk async for chunk in stream]

    events = [e[6:] for e in "".join(asyncio.run(go())).split("\n\n") if e]
    assert events[-1] == "[DONE]" and "the output constraint failed" in json.loads(events[-2])["error"]["message"]
    chunks = [json.loads(e) for e in events[:-2]]
    if route == "generate":
        assert chunks[-1]["text"] == "t0 t1 t2 " and chunks[-1]["output_ids"] == [0, 1, 2]
        assert chunks[-1]["meta_info"]["finish_reason"] is None
    else:
        text = "".join(c["choices"][0]["text"] if route == "completion" else c["choices"][0]["delta"]["content"] or ""
                       for c in chunks)
        assert text == "t0 t1 t2 " and all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_several_requests_deltas_come_merged_per_request() -> None:
    """n > 1 and batch calls: a consumer that fell behind gets one event per request with all its waiting deltas,
    as a single request's stream does (it got one event per engine step of each request). The steps arrive while
    the consumer is behind, one at a time, so each request's own queue never holds two of them: only merged()
    can merge them."""
    from dsaserve.server.streaming import merged

    async def go() -> list[tuple[int, list[int], bool]]:
        handles = [RequestHandle(f"r{i}", 0, None, SamplingParams()) for i in range(2)]  # type: ignore[arg-type]
        stream = merged(handles)
        for h in handles:
            h.queue.put_nowait(_delta(0))
        got = [await stream.__anext__()]  # the consumer then falls behind: the pumps forward each step alone
        for step in (1, 2):
            for h in handles:
                h.queue.put_nowait(_delta(step, FinishReason("length") if step == 2 else None))
                for _ in range(3):
                    await asyncio.sleep(0)
        got += [x async for x in stream]
        return [(i, d.token_ids, d.finish is not None) for i, d in got]
    assert asyncio.run(go()) == [(0, [0], False), (1, [0], False), (0, [1, 2], True), (1, [1, 2], True)]


@pytest.mark.parametrize("fmt", ["dsml", "glm"])
@pytest.mark.parametrize("kind,reason", [("length", "length"), ("stop", "tool_calls")])
def test_a_call_cut_after_complete_ones_is_dropped_streamed_as_whole(fmt: str, kind: str, reason: str) -> None:
    """max_tokens (length) or a stop string (stop) ends a reply inside its second call: the message and the streamed
    deltas carry the first call alone and no content (the cut call's markup was content), and the same finish_reason:
    length for max_tokens; tool_calls for a stop string, which ends the reply as the model's own stop does (OpenAI's
    stop), after a complete call the client is to run."""
    from types import SimpleNamespace

    from dsaserve.chat.parsers import DsmlToolParser, GlmToolParser, OutputParser
    from dsaserve.server import protocol as p
    from dsaserve.server.openai_answers import chat_answer
    from dsaserve.server.openai_api import Call, OpenAIServing
    from test_chat_parsers import D, DSML_TWO, GLM_TWO, TOOLS

    raw = (DSML_TWO if fmt == "dsml" else GLM_TWO).split("</think>")[1]
    reply = raw[:raw.rindex("get_time") + 5]  # cut inside the second call's name
    make = DsmlToolParser if fmt == "dsml" else GlmToolParser
    assert (f"<{D}invoke" if fmt == "dsml" else "<tool_call>") in reply[reply.index("Paris"):]

    def call(handles: list[RequestHandle]) -> Call:
        body = p.ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=TOOLS, stream=bool(handles))
        return Call("c", body, [[5]], handles, "chat", lambda: OutputParser(None, make(TOOLS)), None)

    done = Delta(reply, [1], finish=FinishReason(kind), completion_tokens=1)
    whole = chat_answer(None, "m", call([]), [done])  # type: ignore[arg-type]  (no log-probabilities: no tokenizer)
    message = whole.choices[0].message
    assert (message.content, [c.function.name for c in message.tool_calls or []]) == ("Let me look.", ["get_weather"])
    assert whole.choices[0].finish_reason == reason

    async def go() -> list[str]:
        handle = RequestHandle("r", 0, None, SamplingParams())  # type: ignore[arg-type]
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)]
        for k, text in enumerate(pieces):
            handle.queue.put_nowait(Delta(text, [k], finish=FinishReason(kind) if k == len(pieces) - 1 else None,
                                          completion_tokens=k + 1))
        serving, streamed = OpenAIServing(SimpleNamespace(tokenizer=None), "m", None), call([handle])  # type: ignore
        return [chunk async for chunk in serving._stream(streamed, [streamed.parser()])]

    events = [json.loads(e[6:]) for e in "".join(asyncio.run(go())).split("\n\n") if e and e != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == message.content
    heads = [c for d in deltas for c in d.get("tool_calls") or [] if c.get("id")]
    args = "".join(c["function"].get("arguments", "") for d in deltas for c in d.get("tool_calls") or [])
    assert [c["function"]["name"] for c in heads] == ["get_weather"]
    assert args == message.tool_calls[0].function.arguments  # type: ignore[index]
    assert events[-1]["choices"][0]["finish_reason"] == reason
