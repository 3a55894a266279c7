"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from dsaserve.engine.request import SamplingParams
from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request
from dsaserve.server.frontend import Delta, Frontend, RequestHandle
from dsaserve.server.streaming import (DONE, AbortingStream, Result, aborter, checked, collect, error_event,
                                       merged, until_disconnect)

LogprobList = list[tuple[float, list[tuple[int, float]]]]


class OpenAIServing:
    def __init__(self, frontend: Frontend, served_name: str):
        self.fe, self.served_name = frontend, served_name

    # -- shared ------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise ApiError(404, f"the model {name!r} does not exist (this server serves {self.served_name!r})",
                           param="model", code="model_not_found")

    @staticmethod
    def params(body: p.SamplingFields, max_tokens: int | None, logprobs: int | None, index: int) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        seed = None if body.seed is None else body.seed + index  # n > 1: seeds s, s+1, ...
        return checked(SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=-1 if body.top_k is None else body.top_k,
            min_p=body.min_p or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0, seed=seed, stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs))

    def token_str(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.fe.tokenizer.decode([token], skip_special_tokens=False)

    async def respond(self, request: Request, body: p.SamplingFields, prompts: list[list[int]],
                      max_tokens: int | None, logprobs: int | None, kind: str) -> Any:
        params = [self.params(body, max_tokens, logprobs, i) for _ in prompts for i in range(body.n)]
        flat = [ids for ids in prompts for _ in range(body.n)]
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        handles = await self.fe.submit_many(flat, params, rid, body.routed_dp_rank)
        prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt once, however many choices
        render = self._chat if kind == "chat" else self._completion
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = self._stream(handles, rid, body, prompt_tokens, include_usage, kind)
            return AbortingStream(gen, aborter(self.fe, handles))

        async def gather() -> list[Result]:
            return [await collect(h) for h in handles]

        results = await until_disconnect(request, gather(), aborter(self.fe, handles))
        return render(rid, body, results, prompt_tokens)

    async def _stream(self, handles: list[RequestHandle], rid: str, body: p.SamplingFields, prompt_tokens: int,
                      include_usage: bool, kind: str) -> AsyncIterator[str]:
        offsets = [0] * len(handles)
        completion_tokens = [0] * len(handles)
        if kind == "chat":
            for i in range(len(handles)):
                choice = p.ChatStreamChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))
                yield p.sse(p.ChatCompletionChunk(id=rid, model=self.served_name, choices=[choice]))
        try:
            async for i, d in merged(handles):
                if d.finish is not None and d.finish.kind == "error":
                    raise ApiError(500, d.finish.message or "the request failed in the engine")
                completion_tokens[i] = d.completion_tokens
                yield self._chunk(kind, rid, body, i, d, offsets)
        except Exception as exc:  # an error mid-stream: the client gets it as an event, then [DONE]
            yield error_event(exc)
            yield DONE
            return
        if include_usage:
            use = p.usage(prompt_tokens, sum(completion_tokens))
            chunk_cls = p.ChatCompletionChunk if kind == "chat" else p.CompletionResponse
            yield p.sse(chunk_cls(id=rid, model=self.served_name, choices=[], usage=use))
        yield DONE

    def _chunk(self, kind: str, rid: str, body: p.SamplingFields, i: int, d: Delta, offsets: list[int]) -> str:
        finish = d.finish.kind if d.finish is not None else None
        if kind == "chat":
            lp = self._chat_logprobs(d.token_ids, d.logprobs, body) if body.logprobs else None
            choice = p.ChatStreamChoice(index=i, delta=p.ChatDelta(content=d.text), logprobs=lp, finish_reason=finish)
            return p.sse(p.ChatCompletionChunk(id=rid, model=self.served_name, choices=[choice]))
        clp = None
        if body.logprobs is not None:  # text_offset runs on across chunks
            clp = self._completion_logprobs(d.token_ids, d.logprobs, body, offsets[i])
            offsets[i] = clp.text_offset[-1] + len(clp.tokens[-1]) if clp.tokens else offsets[i]
        choice = p.CompletionChoice(index=i, text=d.text, logprobs=clp, finish_reason=finish)
        return p.sse(p.CompletionResponse(id=rid, model=self.served_name, choices=[choice]))

    # -- completions -------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.fe.tokenizer.encode(prompt)]
        if not prompt or isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return [self.fe.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompt]

    def _completion_logprobs(self, ids: list[int], lps: LogprobList, body: p.SamplingFields,
                             offset: int) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        as_ids = body.return_tokens_as_token_ids
        for token, (chosen, top) in zip(ids, lps):
            s = self.token_str(token, as_ids)
            out.tokens.append(s)
            out.token_logprobs.append(chosen)
            out.top_logprobs.append({self.token_str(t, as_ids): lp for t, lp in top})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def _completion(self, rid: str, body: p.SamplingFields, results: list[Result],
                    prompt_tokens: int) -> p.CompletionResponse:
        choices = []
        for i, r in enumerate(results):
            lp = None
            if getattr(body, "logprobs", None) is not None:
                lp = self._completion_logprobs(r.token_ids, r.logprobs, body, 0)
            choices.append(p.CompletionChoice(index=i, text=r.text, logprobs=lp, finish_reason=r.finish.kind))
        return p.CompletionResponse(id=rid, model=self.served_name, choices=choices,
                                    usage=p.usage(prompt_tokens, sum(r.completion_tokens for r in results)))

    # -- chat --------------------------------------------------------------------------------

    def chat_ids(self, body: p.ChatCompletionRequest) -> list[int]:
        messages = []
        for msg in body.messages:
            content = msg.content
            if isinstance(content, list):
                content = "".join(part.text or "" for part in content if part.type == "text")
            messages.append({"role": msg.role, "content": content or ""})
        try:
            return self.fe.tokenizer.chat(messages)
        except Exception as exc:  # a template that rejects the conversation is the client's problem
            raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from None

    def _chat_logprobs(self, ids: list[int], lps: LogprobList, body: p.SamplingFields) -> p.ChatLogprobs:
        as_ids = body.return_tokens_as_token_ids
        content = []
        for token, (chosen, top) in zip(ids, lps):
            s = self.token_str(token, as_ids)
            tops = [p.TopLogprob(token=(t := self.token_str(tid, as_ids)), logprob=lp, bytes=list(t.encode()))
                    for tid, lp in top]
            content.append(p.TokenLogprob(token=s, logprob=chosen, bytes=list(s.encode()), top_logprobs=tops))
        return p.ChatLogprobs(content=content)

    def _chat(self, rid: str, body: p.SamplingFields, results: list[Result],
              prompt_tokens: int) -> p.ChatCompletionResponse:
        choices = []
        for i, r in enumerate(results):
            lp = self._chat_logprobs(r.token_ids, r.logprobs, body) if getattr(body, "logprobs", False) else None
            choices.append(p.ChatChoice(index=i, message=p.ChatMessageOut(content=r.text), logprobs=lp,
                                        finish_reason=r.finish.kind))
        return p.ChatCompletionResponse(id=rid, model=self.served_name, choices=choices,
                                        usage=p.usage(prompt_tokens, sum(r.completion_tokens for r in results)))


def openai_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> p.ModelList:
        info = serving.fe.info
        return p.ModelList(data=[p.ModelCard(id=serving.served_name, root=info["model_path"],
                                             max_model_len=info["context_length"])])

    @router.post("/v1/completions", response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        serving.check_model(body.model)
        if body.echo:
            raise bad_request("echo is not supported", param="echo")
        prompts = await serving.fe.tokenize(serving.prompt_ids, body.prompt)
        return await serving.respond(request, body, prompts, body.max_tokens, body.logprobs, "completion")

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Any:
        serving.check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = await serving.fe.tokenize(serving.chat_ids, body)  # off the event loop
        return await serving.respond(request, body, [ids], max_tokens, logprobs, "chat")

    return router

