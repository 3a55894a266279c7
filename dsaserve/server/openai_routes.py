"""The OpenAI-compatible HTTP routes over OpenAIServing: /v1/models, /v1/completions, /v1/chat/completions,
/v1/responses, Anthropic's /v1/messages, /tokenize, /detokenize."""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request

from dsaserve.server import protocol as p
from dsaserve.server import messages_api, responses_api
from dsaserve.server.errors import ApiError
from dsaserve.server.guard import arrival
from dsaserve.server.messages_protocol import CountTokensRequest, MessagesRequest
from dsaserve.server.openai_answers import Call
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.responses_protocol import ResponsesRequest
from dsaserve.server.responses_store import StoredResponse


def openai_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    def card() -> p.ModelCard:
        info = serving.fe.info
        return p.ModelCard(id=serving.served_name, root=info["model_path"], max_model_len=info["context_length"])

    @router.get("/v1/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[card()])

    @router.get("/v1/models/{model:path}")  # (a served name may hold slashes: org/model)
    async def model(model: str) -> p.ModelCard:
        serving.check_model(model)
        return card()

    @router.post("/v1/completions", response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        route, dp_rank = await serving.pd.route(body)
        with serving.fe.refusing(route, dp_rank):  # (PD: any refusal also ends the other server's half)
            serving.check_model(body.model)
            serving.check_choices(body.prompt_count, body.n, body.routed_dp_rank)
            prompts, grammar, echo = await serving.fe.tokenize(serving.prepare_completion, body)  # off the loop
            call = await serving.submit(body, route, dp_rank, prompts, body.max_tokens, body.logprobs,
                                        "completion", grammar=grammar, echo=echo, arrived=arrival(request))
        return await serving.respond(request, call)

    async def submit_chat(body: p.ChatCompletionRequest, request: Request) -> Call:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        route, dp_rank = await serving.pd.route(body)
        with serving.fe.refusing(route, dp_rank):  # (PD: any refusal also ends the other server's half)
            serving.check_model(body.model)
            serving.check_choices(1, body.n, body.routed_dp_rank)
            plan = await serving.fe.tokenize(serving.plan_chat, body)  # off the event loop
            return await serving.submit(body, route, dp_rank, [plan.prompt.ids], max_tokens, logprobs, "chat",
                                        plan.parser, plan.grammar, arrived=arrival(request), budget=plan.budget)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Any:
        return await serving.respond(request, await submit_chat(body, request))

    async def submit_translated(body: ResponsesRequest | MessagesRequest, prefix: str, request: Request) -> Call:
        """Another API's request as the chat request it translates to; an error in that API's field names."""
        try:
            return await submit_chat(body.as_chat(f"{prefix}_{uuid.uuid4().hex}"), request)
        except ApiError as exc:
            raise body.renamed(exc) from None

    @router.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        """OpenAI's Responses API: the same chat request, answered as output items (server.responses_api)."""
        if body.previous_response_id is not None:
            body.continuing(stored_response(body.previous_response_id, "previous_response_id").items)
        return await responses_api.respond(request, serving, await submit_translated(body, "resp", request), body)

    def stored_response(rid: str, param: str | None = None) -> StoredResponse:
        stored = serving.responses.get(rid)
        if stored is None:  # (OpenAI: 400 for a previous_response_id, 404 for the path)
            raise ApiError(400 if param else 404, f"Response with id {rid!r} not found (responses are kept in "
                           "memory, the most recent --responses-store-size of them)", param=param,
                           code="previous_response_not_found" if param else None)
        return stored

    @router.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return stored_response(response_id).response

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        stored_response(response_id)
        serving.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @router.post("/v1/messages", response_model=None)
    async def messages(body: MessagesRequest, request: Request) -> Any:
        """Anthropic's Messages API: the same chat request, answered as content blocks (server.messages_api)."""
        return await messages_api.respond(request, serving, await submit_translated(body, "msg", request))

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        """The prompt's tokens, as /v1/messages would render it."""
        serving.check_model(body.model)
        try:
            plan = await serving.fe.tokenize(serving.plan_chat, body.as_chat("count"), endpoint=True)
        except ApiError as exc:
            raise body.renamed(exc) from None
        return {"input_tokens": len(plan.prompt.ids)}

    @router.post("/tokenize")
    @router.post("/v1/tokenize")
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        return await serving.fe.tokenize(serving.tokenize, body, endpoint=True)

    @router.post("/detokenize")
    @router.post("/v1/detokenize")
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return await serving.fe.tokenize(serving.detokenize, body, endpoint=True)

    return router
