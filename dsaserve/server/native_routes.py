"""SGLang's native routes: /generate (one prompt, a batch, n completions each; streamed or not), /abort_request,
/get_model_info and /get_server_info."""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

import dsaserve
from dsaserve.chat import json_text
from dsaserve.chat.constrain import Constraint
from dsaserve.chat.grammar import GrammarSpec
from dsaserve.disagg.serving import PDRouting
from dsaserve.engine.request import SamplingParams, choice_seed
from dsaserve.server import native_protocol as native
from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request
from dsaserve.server.frontend import Frontend, RequestHandle
from dsaserve.server.guard import arrival
from dsaserve.server.openai_answers import token_str
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.streaming import (DONE, AbortingStream, Result, aborter, bias_pairs, checked, collect_call,
                                       engine_refusals_named, error_event, finish_error, merged, prompt_token_logprobs,
                                       prompt_scoring, split_error)

# SamplingParams' names as /generate's sampling_params spell them (errors name the client's field)
_NATIVE_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "include_stop_str": "no_stop_trim"}


def _native_params(sp: native.NativeSamplingParams, max_tokens: int | None, logprobs: int | None,
                   prompt_logprobs: int | None, grammar: GrammarSpec | None, index: int) -> SamplingParams:
    """`index`: the completion's place among its prompt's n (seeds s, s+1, ..., as OpenAI's n)."""
    stop = (sp.stop,) if isinstance(sp.stop, str) else tuple(sp.stop or ())
    return checked(SamplingParams(
        max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
        min_p=sp.min_p, frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty, min_tokens=sp.min_new_tokens, logit_bias=bias_pairs(sp.logit_bias),
        seed=choice_seed(sp.seed, index), stop=stop, include_stop_str=sp.no_stop_trim,
        stop_token_ids=tuple(sp.stop_token_ids or ()), ignore_eos=sp.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, grammar=grammar, skip_special_tokens=sp.skip_special_tokens),
        _NATIVE_NAMES)


def _constraint(sp: native.NativeSamplingParams) -> Constraint:
    """SGLang's regex / json_schema (a JSON string) / ebnf, as the OpenAI routes' constraint."""
    if sum(x is not None for x in (sp.regex, sp.json_schema, sp.ebnf)) > 1:
        raise bad_request("give at most one of regex, json_schema and ebnf", param="sampling_params")
    if sp.json_schema is None:
        return Constraint(regex=sp.regex, ebnf=sp.ebnf)
    try:
        schema = json_text.loads(sp.json_schema, "json_schema")
    except json.JSONDecodeError as exc:
        raise bad_request(f"json_schema is not valid JSON: {exc}", param="json_schema") from None
    except ValueError as exc:  # a lone surrogate
        raise bad_request(str(exc), param="json_schema") from None
    except RecursionError:  # (Python's parser recurses per level: deep nesting was a 500)
        raise bad_request("json_schema nests too deeply to parse", param="json_schema") from None
    if not isinstance(schema, dict):
        raise bad_request("json_schema must be a JSON schema: an object, as a JSON string", param="json_schema")
    return Constraint({"type": "json_schema", "json_schema": {"schema": schema}})


def _entries(serving: OpenAIServing, pairs: list[tuple[float, int]], with_text: bool) -> list[list[Any]]:
    """SGLang's log-probability entries: [logprob, token id, its text or None]."""
    return [[lp, t, token_str(serving.fe.tokenizer, t, False) if with_text else None] for lp, t in pairs]


def _meta(serving: OpenAIServing, handle: RequestHandle, res: Result, body: native.GenerateRequest, ids: list[int],
          decodes: bool = False) -> dict[str, Any]:
    """decodes: the decode half of a PD pair, which never runs the prompt: its prompt log-probabilities are an
    empty list, which sglang-router fills with the prefill server's (their top log-probabilities it drops)."""
    finish = None
    if res.finish is not None:
        finish = {"type": res.finish.kind}
        if res.finish.kind == "length":  # SGLang's: the token limit that ended it
            finish["length"] = res.completion_tokens
        if res.finish.matched is not None:
            finish["matched"] = res.finish.matched
        if res.finish.message:
            finish["message"] = res.finish.message
    meta: dict[str, Any] = {"id": handle.rid, "finish_reason": finish, "prompt_tokens": res.prompt_tokens,
                            "completion_tokens": res.completion_tokens, "cached_tokens": res.cached_tokens,
                            "spec_verify_ct": res.spec_verify_ct, "e2e_latency": time.monotonic() - handle.created}
    if not body.return_logprob:
        return meta
    text, tops = body.return_text_in_logprobs, body.top_logprobs_num > 0  # (SGLang's: top lists only if asked)
    meta["output_token_logprobs"] = _entries(serving, [(lp, t) for t, (lp, _) in zip(res.token_ids, res.logprobs)],
                                             text)
    if tops:
        meta["output_top_logprobs"] = [_entries(serving, [(v, t) for t, v in top], text) for _, top in res.logprobs]
    if decodes and body.logprob_start_len >= 0:
        meta["input_token_logprobs"] = []
        if tops:
            meta["input_top_logprobs"] = []
    elif res.prompt_logprobs is not None:  # logprob_start_len >= 0: the prompt's, from that position
        start = max(body.logprob_start_len, 0)
        scored = prompt_token_logprobs(res.prompt_logprobs, len(ids))[start:]
        meta["input_token_logprobs"] = _entries(serving, [(lp, t) for t, (lp, _) in zip(ids[start:], scored)],
                                                text)
        if tops:
            meta["input_top_logprobs"] = [_entries(serving, [(v, t) for t, v in top], text) or None
                                          for _, top in scored]
    return meta


def _choices_per_prompt(body: native.GenerateRequest) -> int:
    """n, the same in every sampling_params of a batch (a list of them: SGLang's, one per prompt)."""
    sps = body.sampling_params if isinstance(body.sampling_params, list) else [body.sampling_params]
    if not sps:
        raise bad_request("sampling_params is an empty list: give one object, or one per prompt",
                          param="sampling_params")
    if len({sp.n for sp in sps}) > 1:
        raise bad_request(f"n differs across the batch's sampling_params ({sorted({sp.n for sp in sps})}): give one "
                          "n for every prompt", param="sampling_params")
    return sps[0].n


def _per_prompt(body: native.GenerateRequest, count: int) -> list[native.NativeSamplingParams]:
    """Each prompt's sampling_params: one object for all, or a list of one per prompt."""
    if not isinstance(body.sampling_params, list):
        return [body.sampling_params] * count
    if len(body.sampling_params) != count:
        raise bad_request(f"{len(body.sampling_params)} sampling_params for {count} prompts: give one object, or "
                          "one per prompt", param="sampling_params")
    return body.sampling_params


async def _generate_prompts(serving: OpenAIServing, body: native.GenerateRequest,
                            batch: bool) -> tuple[list[list[int]], list[str] | None]:
    """/generate's prompts (tokenized) and per-prompt rids, or a 400 naming what is wrong."""
    fe, n = serving.fe, _choices_per_prompt(body)
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", param="text")
    if isinstance(body.rid, list) and (not batch or n > 1):
        raise bad_request("rid is a list: one rid per prompt of a batch (text or input_ids a list), and n 1 (with "
                          "n > 1 a single rid names the whole call)", param="rid")
    count = len(body.text if body.text is not None else body.input_ids) if batch else 1
    serving.check_choices(count, n, body.routed_dp_rank, "text" if body.text is not None else "input_ids")
    texts = (body.text if batch else [body.text]) if body.text is not None else None
    prompts = [await fe.encode(t) for t in texts] if texts is not None else (
        body.input_ids if batch else [body.input_ids])
    if not prompts:
        raise bad_request("the batch of prompts is empty", param="text" if texts is not None else "input_ids")
    rids = body.rid if isinstance(body.rid, list) else None
    if rids is not None and len(rids) != len(prompts):
        raise bad_request(f"{len(rids)} rid for {len(prompts)} prompts", param="rid")
    _check_logprob_start(body, prompts)
    return prompts, rids


def _check_logprob_start(body: native.GenerateRequest, prompts: list[list[int]]) -> None:
    """The prompt's log-probabilities start at a position it has, or at its end: none of them (an empty
    input_token_logprobs, what clients scoring only the output send: SGLang's rule). Past the end is a 400, as
    SGLang's (it was an empty list, silently)."""
    if not body.return_logprob:
        return
    for i, ids in enumerate(prompts):
        if body.logprob_start_len > len(ids):
            which = f"prompt {i} of the batch" if len(prompts) > 1 else "the prompt"
            raise bad_request(f"logprob_start_len ({body.logprob_start_len}) is past the end of {which} ({len(ids)} "
                              f"tokens): it can be at most {len(ids)}", param="logprob_start_len")


async def generate_stream(serving: OpenAIServing, handles: list[RequestHandle], body: native.GenerateRequest,
                          prompts: list[list[int]], decodes: bool, many: bool) -> AsyncIterator[str]:
    """/generate's stream: sglang's shape, every chunk carries the text and ids so far."""
    results = [Result() for _ in handles]
    try:
        async for i, d in merged(handles):
            d, error = split_error(d)  # (the tokens before an error are sent, then the error)
            res = results[i]
            res.absorb(d)
            if error is None or d.token_ids or d.text:
                chunk = {"text": res.text, "output_ids": res.token_ids,
                         "meta_info": _meta(serving, handles[i], res, body, prompts[i], decodes)}
                yield p.sse({**chunk, "index": i} if many else chunk)
            if error is not None:
                raise finish_error(error)
    except Exception as exc:
        yield error_event(exc)
    yield DONE


def native_router(serving: OpenAIServing) -> APIRouter:
    router, fe, pd = APIRouter(), serving.fe, serving.pd

    @router.post("/generate", response_model=None)
    async def generate(body: native.GenerateRequest, request: Request) -> Any:
        """One prompt (text or input_ids), or SGLang's batch (a list of either): then a list of results, or
        one stream whose chunks carry their `index`. n > 1 answers a list too, each prompt's n in a row."""
        n = _choices_per_prompt(body)
        batch = isinstance(body.text, list) or bool(body.input_ids and isinstance(body.input_ids[0], list))
        logprobs = body.top_logprobs_num if body.return_logprob else None
        route, dp_rank = await pd.route(body)
        decodes = PDRouting.decodes(route)  # the prompt's log-probabilities: the prefill server's answer has them
        with fe.refusing(route, dp_rank):  # (PD: any refusal also ends the other server's half)
            prompts, rids = await _generate_prompts(serving, body, batch)
            sps = _per_prompt(body, len(prompts))
            built = {id(sp): await fe.tokenize(serving.grammar, _constraint(sp), None, False,
                                               "json_schema" if sp.json_schema is not None else None)
                     for sp in {id(sp): sp for sp in sps}.values()}  # (one object for all: built once)
            grammars = [built[id(sp)] for sp in sps]
            pd.check(body, route)
            limits = [prompt_scoring(sp.max_new_tokens, sp.min_new_tokens, _NATIVE_NAMES) for sp in sps]
            if len({only for _, only in limits}) > 1:
                raise bad_request("max_new_tokens 0 (the prompt scored alone) in some of the batch's sampling_params "
                                  "and not in others: send those prompts apart", param="max_new_tokens")
            prompt_only = limits[0][1]
            prompt_lp = logprobs if body.logprob_start_len >= 0 and not decodes else None
            params = [_native_params(sp, max_tokens, logprobs, prompt_lp, grammar, j)
                      for sp, (max_tokens, _), grammar in zip(sps, limits, grammars) for j in range(n)]
            prompts = [ids for ids in prompts for _ in range(n)]
            with engine_refusals_named({**_NATIVE_NAMES, "prompt": "text" if body.text is not None else "input_ids"}):
                if batch or n > 1:
                    base = body.rid if isinstance(body.rid, str) else secrets.token_hex(16)
                    handles = await fe.submit_many(prompts, params, base, dp_rank, route, rids, prompt_only,
                                                   arrival(request))
                else:
                    handles = [await fe.submit(prompts[0], params[0], body.rid, dp_rank, route=route,
                                               scores_only=prompt_only, arrived=arrival(request))]
        many = batch or n > 1
        if body.stream:
            return AbortingStream(generate_stream(serving, handles, body, prompts, decodes, many),
                                  aborter(fe, handles))
        results = await collect_call(request, fe, handles)
        out = [{"text": res.text, "output_ids": res.token_ids,
                "meta_info": _meta(serving, h, res, body, ids, decodes)}
               for h, res, ids in zip(handles, results, prompts)]
        return out if many else out[0]

    @router.post("/abort_request")
    async def abort_request(body: native.AbortRequest) -> dict[str, Any]:  # rid: /generate's, or an OpenAI response id
        if body.abort_all:
            return {"abort_all": True, "aborted": fe.abort_all("aborted by /abort_request (abort_all)")}
        if not fe.abort(body.rid, "aborted by /abort_request"):
            raise ApiError(404, f"no running request with id {body.rid!r}", param="rid")
        return {"rid": body.rid, "aborted": True}

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        """SGLang's: the prefix cache starts empty (a cold benchmark run). Prefixes that running requests hold
        stay; requests sent after this answer never match what was dropped."""
        if fe.problem is not None:
            raise ApiError(503, fe.problem)
        fe.flush_cache()
        return PlainTextResponse("Cache flushed.\n")

    @router.get("/get_load")  # SGLang's; sglang-router's load-aware policies (power_of_two) poll it
    async def get_load() -> list[dict[str, int]]:
        if fe.problem is not None:
            raise ApiError(503, fe.problem)
        return loads(fe)

    @router.get("/get_model_info")
    @router.get("/model_info")  # sglang-router asks here
    async def model_info() -> dict[str, Any]:
        info = fe.info
        return {"model_path": info["model_path"], "tokenizer_path": info["model_path"],
                "served_model_name": serving.served_name, "is_generation": True,
                "model_type": info.get("model_type"), "context_length": info["context_length"],
                "vocab_size": info["vocab_size"]}

    @router.get("/get_server_info")
    @router.get("/server_info")  # sglang-router asks here
    async def server_info() -> JSONResponse:
        fields = dataclasses.asdict(fe.args)
        if fields.get("api_key"):
            fields["api_key"] = "<redacted>"
        return JSONResponse({**fields, "served_model_name": serving.served_name, "model_info": fe.info,
                             "version": getattr(dsaserve, "__version__", "0"), "internal_states": fe.stats()})

    return router


def loads(fe: Frontend) -> list[dict[str, int]]:
    """SGLang's /get_load per DP group, as last pushed: requests running and queued, and tokens held (KV pages in
    use, and the queued requests' tokens); a group that has pushed nothing yet reports zeros."""
    out = []
    for link in fe.links:
        st = fe.engine_stats.get(link.rank)
        if st is None:
            reqs = waiting = tokens = 0
        else:
            reqs, waiting = st.running + st.waiting, st.waiting
            tokens = (st.total_pages - st.free_pages) * fe.args.page_size + st.queued_tokens
        out.append({"dp_rank": link.rank, "num_reqs": reqs, "num_waiting_reqs": waiting, "num_tokens": tokens})
    return out
