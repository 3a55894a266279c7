"""Engine results in OpenAI's answer shapes: the choices of an answer and of each stream chunk, their
log-probabilities, tool calls and usage. OpenAIServing (openai_api) queues a call; these shape what comes back."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from dsaserve.chat.parsers import OutputParser, Parsed, ToolCall
from dsaserve.engine.request import FinishReason
from dsaserve.engine.tokenizer import CharOffsets, Tokenizer
from dsaserve.server import protocol as p
from dsaserve.server.frontend import Delta, RequestHandle
from dsaserve.server.streaming import Result, finish_error, merged, prompt_token_logprobs, split_error

LogprobList = list[tuple[float, list[tuple[int, float]]]]
ParserFactory = Callable[[], OutputParser]


@dataclass(frozen=True)
class Call:
    """A call's queued completions (n per prompt) and what its answer needs."""
    rid: str
    body: p.SamplingFields
    prompts: list[list[int]]
    handles: list[RequestHandle]
    kind: str  # "completion" or "chat"
    parser: ParserFactory | None
    echo: list[str] | None  # each prompt's text, returned before its completion
    created: int = field(default_factory=lambda: int(time.time()))  # one time for the answer and all its chunks
    # the end-of-reasoning token where a reasoning parser splits the reply: its reasoning tokens are counted
    think_end: int | None = None

    def reasoning_tokens(self, output_ids: list[int], reasoned: bool) -> int | None:
        return None if self.think_end is None else reasoning_tokens(output_ids, reasoned, self.think_end)


def reasoning_tokens(output_ids: list[int], reasoned: bool, think_end: int | None) -> int:
    """The reply's tokens before its end-of-reasoning token (all of them if it never came)."""
    return 0 if not reasoned else output_ids.index(think_end) if think_end in output_ids else len(output_ids)


def token_str(tok: Tokenizer, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else tok.decode([token], skip_special_tokens=False)


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: LogprobList, body: p.SamplingFields,
                        offsets: CharOffsets, echoed: str | None = None) -> p.CompletionLogprobs:
    """`offsets`: where the text so far ends (each token's text_offset is its start in the text); `echoed`: the
    prompt's text, which the ids start with."""
    out = p.CompletionLogprobs(text_offset=offsets.take(ids, echoed))
    as_ids = body.return_tokens_as_token_ids
    for token, (chosen, top) in zip(ids, lps):
        name = token_str(tok, token, as_ids)
        out.tokens.append(name)
        out.token_logprobs.append(chosen)
        # OpenAI's: the chosen token's log-probability is always there (up to logprobs + 1 entries)
        out.top_logprobs.append({**{token_str(tok, t, as_ids): lp for t, lp in top}, name: chosen}
                                if chosen is not None else None)
    return out


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: LogprobList, body: p.SamplingFields) -> p.ChatLogprobs:
    """Each token's `bytes` are its own (part of a character, where a character takes several tokens)."""
    as_ids = body.return_tokens_as_token_ids
    content = []
    for token, (chosen, top) in zip(ids, lps):
        tops = [p.TopLogprob(token=token_str(tok, tid, as_ids), logprob=lp, bytes=list(tok.token_bytes(tid)))
                for tid, lp in top]
        content.append(p.TokenLogprob(token=token_str(tok, token, as_ids), logprob=chosen,
                                      bytes=list(tok.token_bytes(token)), top_logprobs=tops))
    return p.ChatLogprobs(content=content)


def matched_stop(finish: FinishReason | None) -> int | str | None:
    """SGLang's matched_stop: the stop string, stop token or EOS id that ended the choice (None for other ends)."""
    return finish.matched if finish is not None and finish.kind == "stop" else None


def cut_off(finish: FinishReason) -> bool:
    """The reply was cut (max_tokens, a stop string), not ended by the model (EOS, a stop token): the parsers drop
    a tool call's opening marker cut short after complete calls."""
    return finish.kind == "length" or (finish.kind == "stop" and isinstance(finish.matched, str))


def chat_stream_choices(tok: Tokenizer, body: p.SamplingFields, i: int, d: Delta, parser: OutputParser | None,
                        calls: list[int]) -> list[p.ChatStreamChoice]:
    """One chunk's choice of text (and logprobs), then two per completed tool call (name, then arguments);
    none while the text is held back (a marker or stop string that may be forming) and nothing else is new.
    `calls`: the tool calls streamed so far, per choice."""
    part = Parsed(content=d.text) if parser is None else parser.feed(d.text)
    if parser is not None and d.finish is not None:
        part.add(parser.finish(cut_off(d.finish)))
    lp = chat_logprobs(tok, d.token_ids, d.logprobs, body) if body.logprobs else None
    # (content null, not "", in a chunk of reasoning alone: clients read a string as the answer begun)
    deltas = [p.ChatDelta(content=part.content if part.content or not part.reasoning else None,
                          reasoning_content=part.reasoning or None)]
    for call in part.calls:
        head = p.ToolCallDelta(index=calls[i], id=call_id(), type="function",
                               function=p.FunctionCall(name=call.name, arguments=""))
        args = p.ToolCallDelta(index=calls[i], function=p.FunctionCall(arguments=call.arguments))
        deltas += [p.ChatDelta(tool_calls=[head]), p.ChatDelta(tool_calls=[args])]
        calls[i] += 1
    if len(deltas) > 1 or (d.finish is None and lp is None):
        if not deltas[0].content and deltas[0].reasoning_content is None and lp is None:
            deltas = deltas[1:]
    choices = []
    for k, delta in enumerate(deltas):
        last = k == len(deltas) - 1
        finish = finish_reason(d.finish.kind, calls[i] > 0) if last and d.finish is not None else None
        stopped_by = matched_stop(d.finish) if finish and not calls[i] else None  # (none beside calls: chat_answer)
        choices.append(p.ChatStreamChoice(index=i, delta=delta, logprobs=lp if k == 0 else None, finish_reason=finish,
                                          matched_stop=stopped_by))
    return choices


def completion_stream_choice(tok: Tokenizer, body: p.SamplingFields, i: int, d: Delta, offsets: list[CharOffsets],
                             prompts: list[list[int]], echo: list[str] | None) -> p.CompletionChoice:
    finish = d.finish.kind if d.finish is not None else None
    echoed = echo[i // body.n] if echo is not None else None  # the choice's first delta starts with its prompt
    ids, lps, text = with_prompt(prompts[i // body.n], echoed, d.prompt_logprobs, d.token_ids, d.logprobs, d.text)
    clp = completion_logprobs(tok, ids, lps, body, offsets[i], echoed) if body.logprobs is not None else None
    return p.CompletionChoice(index=i, text=text, logprobs=clp, finish_reason=finish,
                              matched_stop=matched_stop(d.finish))


def completion_answer(tok: Tokenizer, model: str, call: Call, results: list[Result]) -> p.CompletionResponse:
    body, prompts, echo = call.body, call.prompts, call.echo
    choices = []
    for i, r in enumerate(results):
        echoed = echo[i // body.n] if echo is not None else None
        ids, lps, text = with_prompt(prompts[i // body.n], echoed, r.prompt_logprobs, r.token_ids, r.logprobs, r.text)
        offsets = CharOffsets(tok, not body.skip_special_tokens)
        lp = (completion_logprobs(tok, ids, lps, body, offsets, echoed)
              if getattr(body, "logprobs", None) is not None else None)
        choices.append(p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=r.finish.kind,
                                          matched_stop=matched_stop(r.finish)))
    use = p.usage(sum(len(ids) for ids in prompts), sum(r.completion_tokens for r in results),
                  cached_tokens([r.cached_tokens for r in results], body.n))
    return p.CompletionResponse(id=call.rid, created=call.created, model=model, choices=choices, usage=use)


def chat_answer(tok: Tokenizer, model: str, call: Call, results: list[Result]) -> p.ChatCompletionResponse:
    body, parser, choices, thought = call.body, call.parser, [], []
    prompt_tokens = sum(len(ids) for ids in call.prompts)  # each prompt once, however many choices
    for i, r in enumerate(results):
        lp = chat_logprobs(tok, r.token_ids, r.logprobs, body) if getattr(body, "logprobs", False) else None
        part = Parsed(content=r.text)
        if parser is not None:
            out = parser()
            part = out.feed(r.text).add(out.finish(cut_off(r.finish)))
        # No content beside tool calls or reasoning is null, as SGLang and vLLM answer (an empty reply stays "")
        empty = not part.content and (part.calls or part.reasoning)
        message = p.ChatMessageOut(content=None if empty else part.content,
                                   reasoning_content=part.reasoning or None,
                                   tool_calls=[tool_call_out(c) for c in part.calls] or None)
        choices.append(p.ChatChoice(index=i, message=message, logprobs=lp,
                                    finish_reason=finish_reason(r.finish.kind, bool(part.calls)),
                                    matched_stop=None if part.calls else matched_stop(r.finish)))  # (SGLang's)
        thought.append(call.reasoning_tokens(r.token_ids, bool(part.reasoning)))
    return p.ChatCompletionResponse(id=call.rid, created=call.created, model=model, choices=choices,
                                    usage=p.usage(prompt_tokens, sum(r.completion_tokens for r in results),
                                                  cached_tokens([r.cached_tokens for r in results], body.n),
                                                  None if call.think_end is None else sum(thought)))


def with_prompt(prompt: list[int], echoed: str | None, scored: LogprobList | None, ids: list[int],
                lps: LogprobList, text: str) -> tuple[list[int], LogprobList, str]:
    """Echo (`echoed`: the prompt's text): the prompt's tokens before the completion's (the first has no
    log-probability), its text before the completion's; else the completion's as they are."""
    if echoed is None:
        return ids, lps, text
    return prompt + ids, prompt_token_logprobs(scored, len(prompt)) + list(lps), echoed + text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_out(call: ToolCall) -> p.ToolCallOut:
    return p.ToolCallOut(id=call_id(), function=p.FunctionCall(name=call.name, arguments=call.arguments))


def finish_reason(kind: str, called: bool) -> str:
    """OpenAI's `tool_calls` when the model stopped after calling tools."""
    return "tool_calls" if called and kind == "stop" else kind


def cached_tokens(per_choice: list[int], n: int) -> int:
    """Prompt tokens served from the prefix cache, each prompt counted once (its best of n choices)."""
    return sum(max(per_choice[i:i + n]) for i in range(0, len(per_choice), n))


class DeltaWriter(Protocol):
    """What an API translated from chat completions writes a reply into (responses_api, messages_api)."""
    def reasoning(self, text: str) -> None: ...
    def content(self, text: str) -> None: ...
    def call(self, call_id: str, name: str) -> None: ...
    def arguments(self, text: str) -> None: ...


def write_delta(writer: DeltaWriter, delta: p.ChatDelta) -> None:
    """A chat delta (a stream's, or a whole reply as one) into the writer: reasoning, text, then each tool call's
    name and arguments."""
    writer.reasoning(delta.reasoning_content or "")
    writer.content(delta.content or "")
    for tc in delta.tool_calls or []:
        if tc.id is not None:
            writer.call(tc.id, tc.function.name or "")
        if tc.function.arguments:
            writer.arguments(tc.function.arguments)


class StreamWriter(DeltaWriter, Protocol):
    events: list[str]  # what the writer emitted since the last piece of the stream was sent

    def fail(self, exc: Exception) -> None: ...


async def written_stream(tok: Tokenizer, call: Call, writer: StreamWriter, seen: Callable[[Delta], None],
                         finish: Callable[[p.ChatStreamChoice, Delta], None]) -> AsyncIterator[str]:
    """A chat call's stream written into another API's writer (responses_api, messages_api): `seen` takes each
    delta first, its choices go through write_delta, `finish` takes the choice that ends; the writer's events
    are sent once per delta; an error mid-stream is the writer's failure (its message says what was wrong)."""
    calls, parser = [0], call.parser() if call.parser else None
    try:
        async for _, d in merged(call.handles):
            d, error = split_error(d)
            seen(d)
            for choice in chat_stream_choices(tok, call.body, 0, d, parser, calls):
                write_delta(writer, choice.delta)
                if choice.finish_reason is not None:
                    finish(choice, d)
            if error is not None:
                raise finish_error(error)
            yield "".join(writer.events)
            writer.events.clear()
    except Exception as exc:
        writer.fail(exc)
        yield "".join(writer.events)


def whole_delta(message: p.ChatMessageOut) -> p.ChatDelta:
    """A whole chat reply as one delta."""
    calls = [p.ToolCallDelta(index=k, id=tc.id, type="function", function=tc.function)
             for k, tc in enumerate(message.tool_calls or [])]
    return p.ChatDelta(reasoning_content=message.reasoning_content, content=message.content, tool_calls=calls or None)
