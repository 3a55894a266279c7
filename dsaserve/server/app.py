"""FastAPI app: OpenAI routes, native /generate, health, server info, abort and metrics."""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import dsaserve
from dsaserve.disagg.serving import PDRouting
from dsaserve.engine.request import SamplingParams
from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request, install_error_handlers
from dsaserve.server.frontend import Frontend, RequestHandle
from dsaserve.server.guard import RequestGuard
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.openai_routes import openai_router
from dsaserve.server.streaming import (DONE, AbortingStream, Result, aborter, bias_pairs, checked, collect_all,
                                       collect_call, error_event, finish_error, merged, prompt_token_logprobs,
                                       prompt_scoring)
from dsaserve.server_args import ServerArgs

HEALTH_GENERATE_TIMEOUT_S = 60.0


def create_app(args: ServerArgs, frontend: Frontend, metrics: ServerMetrics, served_name: str,
               pd: PDRouting) -> FastAPI:
    app = FastAPI(title="dsaserve", version=getattr(dsaserve, "__version__", "0"))
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limit=args.max_request_bytes)

    async def require_key(request: Request) -> None:  # async: no thread pool hop per request
        if args.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {args.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    open_routes = APIRouter()  # health checks and metrics stay reachable without a key
    _health_routes(open_routes, frontend, metrics)
    app.include_router(open_routes)
    app.include_router(openai_router(OpenAIServing(frontend, served_name, pd)), dependencies=[Depends(require_key)])
    app.include_router(_native_routes(args, frontend, served_name, pd), dependencies=[Depends(require_key)])
    return app


def _health_routes(router: APIRouter, fe: Frontend, metrics: ServerMetrics) -> None:
    @router.get("/health")
    async def health() -> Response:
        if fe.problem is not None:
            raise ApiError(503, fe.problem)
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """One greedy token on every DP rank proves that the whole path works."""
        await health()
        ids = await fe.encode("Hello")
        params = SamplingParams(max_tokens=1, temperature=0.0)

        handles: list[RequestHandle] = []
        abort = aborter(fe, handles, "the health check ended")  # (a timeout leaves nothing running)

        async def submit(rank: int) -> None:
            handles.append(await fe.submit(ids, params, f"health-{rank}-{time.monotonic_ns()}", rank))

        async def generate() -> list[Result]:  # the submits too: a leader stuck in a step never accepts
            # every submit ends before any failure is raised, so that the abort below finds all the handles
            submitted = await asyncio.gather(*(submit(link.rank) for link in fe.links), return_exceptions=True)
            failed = [r for r in submitted if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            return await collect_all(handles, abort)
        try:
            results = await asyncio.wait_for(generate(), HEALTH_GENERATE_TIMEOUT_S)
        except BaseException as exc:
            abort()
            if isinstance(exc, asyncio.TimeoutError):
                raise ApiError(503, f"no token within {HEALTH_GENERATE_TIMEOUT_S:.0f} s") from None
            raise
        if any(len(r.token_ids) != 1 for r in results):
            raise ApiError(503, "a health generation ended without a token")
        return Response(status_code=200)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(fe.stats()), media_type=CONTENT_TYPE_LATEST)


def _native_params(sp: p.NativeSamplingParams, max_tokens: int | None, logprobs: int | None,
                   prompt_logprobs: int | None) -> SamplingParams:
    stop = (sp.stop,) if isinstance(sp.stop, str) else tuple(sp.stop or ())
    return checked(SamplingParams(
        max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
        min_p=sp.min_p, frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty, min_tokens=sp.min_new_tokens, logit_bias=bias_pairs(sp.logit_bias),
        seed=sp.seed, stop=stop, include_stop_str=sp.no_stop_trim, stop_token_ids=tuple(sp.stop_token_ids or ()),
        ignore_eos=sp.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs))


def _meta(handle: RequestHandle, res: Result, body: p.GenerateRequest, ids: list[int],
          decodes: bool = False) -> dict[str, Any]:
    """decodes: the decode half of a PD pair, which never runs the prompt: its prompt log-probabilities are an
    empty list, which sglang-router fills with the prefill server's (their top log-probabilities it drops)."""
    finish = None
    if res.finish is not None:
        finish = {"type": res.finish.kind}
        if res.finish.matched is not None:
            finish["matched"] = res.finish.matched
        if res.finish.message:
            finish["message"] = res.finish.message
    meta: dict[str, Any] = {"id": handle.rid, "finish_reason": finish, "prompt_tokens": res.prompt_tokens,
                            "completion_tokens": res.completion_tokens, "cached_tokens": res.cached_tokens,
                            "spec_verify_ct": res.spec_verify_ct, "e2e_latency": time.monotonic() - handle.created}
    if body.return_logprob:
        meta["output_token_logprobs"] = [[lp, t] for t, (lp, _) in zip(res.token_ids, res.logprobs)]
        meta["output_top_logprobs"] = [[[v, t] for t, v in top] for _, top in res.logprobs]
        if decodes and body.logprob_start_len >= 0:
            meta["input_token_logprobs"] = meta["input_top_logprobs"] = []
        elif res.prompt_logprobs is not None:  # logprob_start_len >= 0: the prompt's, from that position
            scored = prompt_token_logprobs(res.prompt_logprobs, len(ids))
            start = max(body.logprob_start_len, 0)
            meta["input_token_logprobs"] = [[lp, t] for t, (lp, _) in zip(ids[start:], scored[start:])]
            meta["input_top_logprobs"] = [[[v, t] for t, v in top] or None for _, top in scored[start:]]
    return meta


async def _generate_prompts(fe: Frontend, body: p.GenerateRequest,
                            batch: bool) -> tuple[list[list[int]], list[str] | None]:
    """/generate's prompts (tokenized) and per-prompt rids, or a 400 naming what is wrong."""
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", param="text")
    if isinstance(body.rid, list) and not batch:
        raise bad_request("rid is a list: that needs a batch of prompts (text or input_ids a list)", param="rid")
    texts = (body.text if batch else [body.text]) if body.text is not None else None
    prompts = [await fe.encode(t) for t in texts] if texts is not None else (
        body.input_ids if batch else [body.input_ids])
    if not prompts:
        raise bad_request("the batch of prompts is empty", param="text" if texts is not None else "input_ids")
    rids = body.rid if isinstance(body.rid, list) else None
    if rids is not None and len(rids) != len(prompts):
        raise bad_request(f"{len(rids)} rid for {len(prompts)} prompts", param="rid")
    return prompts, rids


def _native_routes(args: ServerArgs, fe: Frontend, served_name: str, pd: PDRouting) -> APIRouter:
    router = APIRouter()

    @router.post("/generate", response_model=None)
    async def generate(body: p.GenerateRequest, request: Request) -> Any:
        """One prompt (text or input_ids), or SGLang's batch (a list of either): then a list of results, or
        one stream whose chunks carry their prompt's `index`."""
        batch = isinstance(body.text, list) or bool(body.input_ids and isinstance(body.input_ids[0], list))
        logprobs = body.top_logprobs_num if body.return_logprob else None
        route, dp_rank = await pd.route(body)
        decodes = PDRouting.decodes(route)  # the prompt's log-probabilities: the prefill server's answer has them
        with fe.refusing(route, dp_rank):  # (PD: any refusal also ends the other server's half)
            prompts, rids = await _generate_prompts(fe, body, batch)
            pd.check(body, route)
            max_tokens, prompt_only = prompt_scoring(body.sampling_params.max_new_tokens,
                                                     body.sampling_params.min_new_tokens, "max_new_tokens")
            params = _native_params(body.sampling_params, max_tokens, logprobs,
                                    logprobs if body.logprob_start_len >= 0 and not decodes else None)
            if batch:
                base = body.rid if isinstance(body.rid, str) else secrets.token_hex(16)
                handles = await fe.submit_many(prompts, [params] * len(prompts), base, dp_rank, route, rids,
                                               prompt_only)
            else:
                handles = [await fe.submit(prompts[0], params, body.rid, dp_rank, route=route,
                                           scores_only=prompt_only)]
        if body.stream:
            return AbortingStream(_generate_stream(handles, body, prompts, decodes, batch), aborter(fe, handles))

        results = await collect_call(request, fe, handles)
        out = [{"text": res.text, "output_ids": res.token_ids, "meta_info": _meta(h, res, body, ids, decodes)}
               for h, res, ids in zip(handles, results, prompts)]
        return out if batch else out[0]

    async def _generate_stream(handles: list[RequestHandle], body: p.GenerateRequest, prompts: list[list[int]],
                               decodes: bool, batch: bool) -> AsyncIterator[str]:
        results = [Result() for _ in handles]  # sglang's shape: every chunk carries the text and ids so far
        try:
            async for i, d in merged(handles):
                res = results[i]
                res.absorb(d)
                if d.finish is not None and d.finish.kind == "error":
                    raise finish_error(d.finish)
                chunk = {"text": res.text, "output_ids": res.token_ids,
                         "meta_info": _meta(handles[i], res, body, prompts[i], decodes)}
                yield p.sse({**chunk, "index": i} if batch else chunk)
        except Exception as exc:
            yield error_event(exc)
        yield DONE

    @router.post("/abort_request")
    async def abort_request(body: p.AbortRequest) -> dict[str, Any]:  # rid: /generate's, or an OpenAI response id
        if body.abort_all:
            return {"abort_all": True, "aborted": fe.abort_all("aborted by /abort_request (abort_all)")}
        if not fe.abort(body.rid, "aborted by /abort_request"):
            raise ApiError(404, f"no running request with id {body.rid!r}", param="rid")
        return {"rid": body.rid, "aborted": True}

    @router.get("/get_model_info")
    @router.get("/model_info")  # sglang-router asks here
    async def model_info() -> dict[str, Any]:
        info = fe.info
        return {"model_path": info["model_path"], "tokenizer_path": info["model_path"],
                "served_model_name": served_name, "is_generation": True, "model_type": info.get("model_type"),
                "context_length": info["context_length"], "vocab_size": info["vocab_size"]}

    @router.get("/get_server_info")
    @router.get("/server_info")  # sglang-router asks here
    async def server_info() -> JSONResponse:
        fields = dataclasses.asdict(args)
        if fields.get("api_key"):
            fields["api_key"] = "<redacted>"
        return JSONResponse({**fields, "served_model_name": served_name, "model_info": fe.info,
                             "version": getattr(dsaserve, "__version__", "0"),
                             "internal_states": fe.stats()})

    return router
