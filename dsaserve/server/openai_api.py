"""OpenAI-compatible serving: the completions and chat calls (checked, queued, answered or streamed), tokenizer
endpoints. The answers' shapes are openai_answers'."""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from fastapi import Request

from dsaserve.chat.constrain import MARKUP_TEXTS, THINK_END, Constraint, Markup, build_grammar, markup_for, single_token
from dsaserve.chat.grammar import GrammarError, GrammarSpec, checked_spec, ll_tokenizer
from dsaserve.chat.parsers import DEFAULT_TOOL_PARSER, OutputParser, ReasoningSplitter, tool_parser
from dsaserve.chat.render import ChatFormat, ChatFormatError, RenderedChat
from dsaserve.chat.tools import ToolPlan, check_held_calls, plan_tools
from dsaserve.disagg.serving import PDRouting
from dsaserve.engine.request import DisaggRoute, SamplingParams, choice_seed
from dsaserve.engine.thinking import ThinkingBudget
from dsaserve.engine.tokenizer import CharOffsets
from dsaserve.generation_config import GenerationConfig, read_generation_config
from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request
from dsaserve.server.frontend import Frontend
from dsaserve.server.openai_answers import (Call, ParserFactory, cached_tokens, chat_answer, chat_stream_choices,
                                            completion_answer, completion_stream_choice)
from dsaserve.server.responses_store import ResponseStore
from dsaserve.server.streaming import (DONE, AbortingStream, aborter, bias_pairs, checked, collect_call,
                                       engine_refusals_named, error_event, finish_error, merged, prompt_scoring,
                                       split_error)


@dataclass(frozen=True)
class ChatPlan:
    prompt: RenderedChat
    tools: ToolPlan
    parser: ParserFactory | None  # one parser per choice; None: the text is the content
    grammar: GrammarSpec | None
    budget: ThinkingBudget | None  # the reasoning's, where the prompt opens reasoning and the request gives one


class OpenAIServing:
    def __init__(self, frontend: Frontend, served_name: str, pd: PDRouting):
        self.fe, self.served_name, self.pd = frontend, served_name, pd

    @functools.cached_property
    def responses(self) -> ResponseStore:  # /v1/responses' stored ones
        return ResponseStore(self.fe.args.responses_store_size)

    @functools.cached_property
    def chat_format(self) -> ChatFormat:  # the tokenizer exists once the frontend has started
        return ChatFormat(self.fe.tokenizer, self.fe.args.tokenizer_mode, self.fe.info.get("model_type"))

    @functools.cached_property
    def markup(self) -> Markup:
        return markup_for(self.fe.tokenizer.hf, ll_tokenizer(*self._vocab()), MARKUP_TEXTS)

    @functools.cached_property
    def think_end_id(self) -> int | None:  # the token a thinking budget forces
        return single_token(self.fe.tokenizer.hf, THINK_END)

    def _vocab(self) -> tuple[str, tuple[int, ...]]:
        return self.fe.info["model_path"], tuple(self.fe.info["eos_token_ids"])

    def grammar(self, c: Constraint, tool_format: str | None = None, opens_reasoning: bool = False,
                param: str | None = None) -> GrammarSpec | None:
        """The checked grammar of a request's constraint; a 400 naming the problem (and `param`) if it is invalid."""
        formatted = bool(c.response_format) and c.response_format.get("type") != "text"
        param = param or ("tool_choice" if c.forced_tools else "regex" if c.regex is not None else
                          "ebnf" if c.ebnf is not None else "response_format" if formatted else "tools")
        try:
            if c.empty:
                return None
            if self.fe.args.grammar_backend == "none":
                if replace(c, strict_tools=None).empty:  # strict tools under auto: their calls parsed, not held
                    return None
                raise GrammarError("structured output is off on this server (--grammar-backend none)")
            return checked_spec(build_grammar(c, tool_format, self.markup, opens_reasoning), *self._vocab())
        except GrammarError as exc:
            raise bad_request(f"{param}: {exc}", param=param) from None

    # -- shared ------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """None (vLLM's optional model), "default" (SGLang's examples) and "unknown" (what sglang-router sends for a
        request that names no model) name the served model."""
        if name not in (None, "default", "unknown", self.served_name):
            raise ApiError(404, f"the model {name!r} does not exist (this server serves {self.served_name!r})",
                           param="model", code="model_not_found")

    def check_choices(self, prompts: int, n: int, routed_dp_rank: int | None, prompt_param: str = "prompt") -> None:
        """A request's completions are queued all at once (round robin over the DP groups unless routed to
        one): more than the queues hold is never admitted (a 400 before any tokenizing, not a 503 that
        retrying cannot cure)."""
        queues = 1 if routed_dp_rank is not None else len(self.fe.links)
        limit = self.fe.args.max_queued_requests * queues
        if prompts * n > limit:  # (--max-queued-requests >= 1)
            raise bad_request(f"the request asks for {prompts * n} completions ({prompts} prompt(s) x n = "
                              f"{n}) and the server queues at most {limit} (--max-queued-requests x "
                              f"{queues} DP group(s))", param="n" if prompts == 1 else prompt_param)

    @staticmethod
    def names(body: p.SamplingFields) -> dict[str, str]:
        """SamplingParams' names (and the prompt's) as the request spells them (errors name the field the client
        sent)."""
        max_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        return {"max_tokens": max_name, "include_stop_str": "include_stop_str_in_output",
                "prompt": "messages" if isinstance(body, p.ChatInput) else "prompt"}

    @functools.cached_property
    def sampling_defaults(self) -> GenerationConfig:
        """--sampling-defaults model: the checkpoint's generation_config.json (preflight read it once already)."""
        model = self.fe.args.sampling_defaults == "model"
        return read_generation_config(self.fe.info["model_path"]) if model else GenerationConfig()

    def params(self, body: p.SamplingFields, max_tokens: int | None, logprobs: int | None, index: int,
               grammar: GrammarSpec | None = None, prompt_logprobs: int | None = None,
               budget: ThinkingBudget | None = None) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        given = self.sampling_defaults.default
        return checked(SamplingParams(
            max_tokens=max_tokens, temperature=given("temperature", 1.0) if body.temperature is None
            else body.temperature, top_p=given("top_p", 1.0) if body.top_p is None else body.top_p,
            top_k=given("top_k", -1) if body.top_k is None else body.top_k,
            min_p=given("min_p", 0.0) if body.min_p is None else body.min_p,
            frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
            repetition_penalty=given("repetition_penalty", 1.0) if body.repetition_penalty is None
            else body.repetition_penalty,
            min_tokens=body.min_tokens or 0, logit_bias=bias_pairs(body.logit_bias),
            seed=choice_seed(body.seed, index), stop=stop,
            include_stop_str=body.include_stop_str_in_output,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            grammar=grammar, prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens,
            thinking_budget=budget),
            OpenAIServing.names(body))

    async def submit(self, body: p.SamplingFields, route: DisaggRoute | None, dp_rank: int | None,
                     prompts: list[list[int]], max_tokens: int | None, logprobs: int | None, kind: str,
                     parser: ParserFactory | None = None, grammar: GrammarSpec | None = None,
                     echo: list[str] | None = None, arrived: float | None = None,
                     budget: ThinkingBudget | None = None) -> Call:
        """Queue a call's completions (inside Frontend.refusing). `echo`: each prompt's text, returned before
        its completion (with its tokens' log-probabilities when logprobs are asked for)."""
        scored = logprobs if echo is not None else None
        self.pd.check(body, route)
        if scored is not None and PDRouting.decodes(route):
            raise bad_request("echo with logprobs asks for the prompt's log-probabilities, which the prefill "
                              "server computes and a PD decode server does not: send it to a server without "
                              "disaggregation", param="echo")
        prompt_only = False  # (chat: max_tokens 0 stays a 400)
        if kind == "completion":
            max_tokens, prompt_only = prompt_scoring(max_tokens, body.min_tokens or 0, self.names(body))
        params = [self.params(body, max_tokens, logprobs, i, grammar, scored, budget)
                  for _ in prompts for i in range(body.n)]
        flat = [ids for ids in prompts for _ in range(body.n)]
        rid = body.rid or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        with engine_refusals_named(self.names(body)):
            handles = await self.fe.submit_many(flat, params, rid, dp_rank, route, scores_only=prompt_only,
                                                arrived=arrived)
        splits = parser is not None and parser().reasoning is not None  # (a reasoning parser: count its tokens)
        return Call(rid, body, prompts, handles, kind, parser, echo, think_end=self.think_end_id if splits else None)

    async def respond(self, request: Request, call: Call) -> Any:
        """The call's answer, or its stream."""
        if call.body.stream:
            parsers = [call.parser() if call.parser else None for _ in call.handles]
            return AbortingStream(self._stream(call, parsers), aborter(self.fe, call.handles))
        results = await collect_call(request, self.fe, call.handles)
        answer = chat_answer if call.kind == "chat" else completion_answer
        return answer(self.fe.tokenizer, self.served_name, call, results)

    async def _stream(self, call: Call, parsers: list[OutputParser | None]) -> AsyncIterator[str]:
        handles, body, prompts, echo = call.handles, call.body, call.prompts, call.echo
        options = body.stream_options or p.StreamOptions()
        running = options.include_usage and options.continuous_usage_stats  # (vLLM's rule: both)
        chunk_cls = p.ChatCompletionChunk if call.kind == "chat" else p.CompletionResponse
        offsets = [CharOffsets(self.fe.tokenizer, not body.skip_special_tokens) for _ in handles]  # across chunks
        completion_tokens, cached = [0] * len(handles), [0] * len(handles)
        calls = [0] * len(handles)  # tool calls streamed so far, per choice
        output_ids: list[list[int]] = [[] for _ in handles]
        reasoned = [False] * len(handles)  # a choice's reply has reasoning

        def thought(i: int) -> int | None:
            return call.reasoning_tokens(output_ids[i], reasoned[i])

        def usage() -> p.UsageInfo:
            every = [thought(i) for i in range(len(handles))]
            return p.usage(sum(len(ids) for ids in prompts), sum(completion_tokens), cached_tokens(cached, body.n),
                           None if call.think_end is None else sum(every))

        def choice_usage(i: int) -> p.UsageInfo | None:  # continuous_usage_stats: choice i's so far
            return p.usage(len(prompts[i // body.n]), completion_tokens[i], cached[i], thought(i)) if running else None

        def chunk(choices: list[Any], usage: p.UsageInfo | None = None) -> str:
            return p.sse(chunk_cls(id=call.rid, created=call.created, model=self.served_name, choices=choices,
                                   usage=usage))
        if call.kind == "chat":
            for i in range(len(handles)):
                yield chunk([p.ChatStreamChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))],
                            choice_usage(i))
        try:
            async for i, d in merged(handles):
                d, error = split_error(d)  # (the tokens before an error are sent, then the error)
                completion_tokens[i], cached[i] = d.completion_tokens, d.cached_tokens
                if call.kind == "chat":
                    choices = chat_stream_choices(self.fe.tokenizer, body, i, d, parsers[i], calls)
                    if call.think_end is not None:  # (only where reasoning tokens are counted)
                        output_ids[i] += d.token_ids
                        # (held back under stream_reasoning false, reasoning so far counts before it is sent)
                        reasoned[i] = reasoned[i] or any(c.delta.reasoning_content for c in choices) or \
                            (parsers[i] is not None and parsers[i].reasoning_open)
                else:
                    first = echo is not None and d.completion_tokens == len(d.token_ids)  # its first delta
                    choices = [completion_stream_choice(self.fe.tokenizer, body, i, d, offsets, prompts,
                                                        echo if first else None)]
                if choices and (error is None or d.token_ids or d.text):
                    yield "".join(chunk([c], choice_usage(i)) for c in choices)
                if error is not None:
                    raise finish_error(error)
        except Exception as exc:  # an error mid-stream: the client gets it as an event, then [DONE]
            yield error_event(exc)
            yield DONE
            return
        if options.include_usage:
            yield chunk([], usage())
        yield DONE

    # -- completions -------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int] | list[str] | list[list[int]],
                   add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt or isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        for text in prompt:
            if isinstance(text, str):
                self.fe.check_prompt_chars(len(text))
        return [self.fe.tokenizer.encode(x, add_special_tokens) if isinstance(x, str) else list(x) for x in prompt]

    def prepare_completion(self, body: p.CompletionRequest) -> tuple[list[list[int]], GrammarSpec | None,
                                                                      list[str] | None]:
        """Token ids, grammar and echoed texts of a completion request (tokenizer work: off the event loop)."""
        prompts = self.prompt_ids(body.prompt, body.add_special_tokens)
        grammar = self.grammar(Constraint(body.response_format, body.regex, body.ebnf))
        return prompts, grammar, self.prompt_texts(body.prompt, prompts) if body.echo else None

    def prompt_texts(self, prompt: str | list[int] | list[str] | list[list[int]], ids: list[list[int]]) -> list[str]:
        """The prompts as given (text), or decoded (token ids): what `echo` returns before each completion."""
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        return [x if isinstance(x, str) else self.fe.tokenizer.decode(t, skip_special_tokens=False)
                for x, t in zip(items, ids)]

    # -- chat --------------------------------------------------------------------------------

    def render(self, body: p.ChatInput, tools: list[dict[str, Any]] | None) -> RenderedChat:
        if body.continue_final_message and body.add_generation_prompt:  # (vLLM's rule, and transformers')
            raise bad_request("continue_final_message needs add_generation_prompt: false (the reply continues the "
                              "last message instead of opening a new one)", param="continue_final_message")
        try:
            return self.chat_format.render([m.plain() for m in body.messages], tools, body.template_kwargs(),
                                           body.add_generation_prompt, body.continue_final_message)
        except ChatFormatError as exc:
            raise bad_request(str(exc), param=exc.param) from None

    def plan_chat(self, body: p.ChatCompletionRequest) -> ChatPlan:
        self.fe.check_prompt_chars(_message_chars(body.messages), "messages")
        tools = checked_tools(body.tools, body.tool_choice, forcing=True)
        prompt = self.render(body, tools.tools)
        reasoning = self.fe.args.reasoning_parser if body.separate_reasoning else None
        tool_parser_name = None
        if tools.parse:
            model_type = self.fe.info.get("model_type")
            tool_parser_name = self.fe.args.tool_call_parser or DEFAULT_TOOL_PARSER.get(model_type or "")
            if tool_parser_name is None:
                raise bad_request(f"tools need a tool-call parser and model type {model_type!r} has no default: "
                                  "start the server with --tool-call-parser", param="tools")
        several = tools.choice in ("required", "auto") and body.parallel_tool_calls is not False
        constraint = Constraint(body.response_format, body.regex, body.ebnf, tools.forced, several, tools.strict)
        grammar = self.grammar(constraint, tool_parser_name, prompt.opens_reasoning)
        # an answer format beside strict tools: the reply is that answer or calls (markup inside an answer is text)
        calls_first = grammar is not None and bool(tools.strict) and not replace(constraint, strict_tools=None).empty
        budget = self.thinking_budget(body.thinking_budget, prompt.opens_reasoning)
        if reasoning is None and tool_parser_name is None:
            return ChatPlan(prompt, tools, None, grammar, budget)

        def parser() -> OutputParser:
            splitter = ReasoningSplitter(prompt.opens_reasoning, whole=not body.stream_reasoning)
            calls = 1 if body.parallel_tool_calls is False else None
            return OutputParser(splitter if reasoning else None,
                                tool_parser(tool_parser_name, tools.tools, calls, bool(tools.forced), calls_first)
                                if tool_parser_name else None)
        return ChatPlan(prompt, tools, parser, grammar, budget)

    def thinking_budget(self, tokens: int | None, opens_reasoning: bool) -> ThinkingBudget | None:
        """The budget of the reasoning the prompt opens (a prompt that opens none has nothing to bound)."""
        if tokens is None or not opens_reasoning:
            return None
        if self.think_end_id is None:
            raise bad_request(f"thinking_budget needs a tokenizer that holds {THINK_END} as one token (it ends the "
                              "reasoning at the budget); this model's does not", param="thinking_budget")
        return ThinkingBudget(tokens, self.think_end_id)

    # -- tokenizer endpoints -----------------------------------------------------------------

    def tokenize(self, body: p.TokenizeRequest) -> p.TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            self.fe.check_prompt_chars(len(body.prompt))  # (chat completions' limits: the same text, the same cost)
            ids = self.fe.tokenizer.encode(body.prompt, body.add_special_tokens)
        else:
            self.fe.check_prompt_chars(_message_chars(body.messages), "messages")
            tools = checked_tools(body.tools, body.tool_choice).tools  # ("none": left out, as chat leaves them)
            chat = p.ChatInput(messages=body.messages, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs,
                               reasoning_effort=body.reasoning_effort,
                               add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message)
            ids = self.render(chat, tools).ids
        strs = self.fe.tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return p.TokenizeResponse(count=len(ids), max_model_len=self.fe.info["context_length"], tokens=ids,
                                  token_strs=strs)

    def detokenize(self, body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        self.check_model(body.model)
        vocab, context = self.fe.info["vocab_size"], self.fe.info["context_length"]
        if len(body.tokens) > context:  # (no sequence of this model is longer; 16 MiB of ids decode for a second)
            raise bad_request(f"tokens holds {len(body.tokens)} ids, more than the context length ({context})",
                              param="tokens")
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return p.DetokenizeResponse(prompt=self.fe.tokenizer.decode(body.tokens, skip_special_tokens=False))


def _message_chars(messages: list[p.ChatMessage]) -> int:
    """The characters of a conversation's contents (what check_prompt_chars bounds before templating)."""
    return sum(len(m.content) if isinstance(m.content, str) else sum(len(x.text) for x in m.content or [])
               for m in messages)


def checked_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                  forcing: bool = False) -> ToolPlan:
    """The tools the prompt shows and the choice among them, or a 400 naming the field at fault. `forcing`: the
    reply's calls will be constrained (forced, or strict tools under auto), by a grammar the engine must be able to
    follow (check_held_calls)."""
    try:
        plan = plan_tools(tools, tool_choice)
        if forcing:
            check_held_calls(plan)
        return plan
    except ValueError as exc:  # (the messages start with the field at fault: tools or tool_choice)
        raise bad_request(str(exc), param="tools" if str(exc).startswith("tools") else "tool_choice") from None
