"""pydantic models of the HTTP API: OpenAI completions / chat completions and the native endpoints."""
from __future__ import annotations

import time
from typing import Any, Literal, get_args

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from pydantic.fields import FieldInfo

from dsaserve.chat.render import thinking_kwargs

TokenIds = list[StrictInt]  # token ids in requests: JSON integers only (true or 2.0 is not a token id)


def _takes_null(field: FieldInfo) -> bool:
    return field.annotation is None or type(None) in get_args(field.annotation)


class ClientBody(BaseModel):
    # OpenAI clients send fields we do not use (user, ...): accept and ignore them.
    # Booleans of request bodies are StrictBool: lax pydantic reads "no", "off" or 0 as false, where OpenAI's API
    # answers 400 for a non-boolean (and SGLang's native API takes any non-empty string as true).
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's API takes null for its optional fields ("integer or null, defaults to 1": n, stream, echo,
        logprobs), and its Python client sends a None argument as null: where a field takes no null, null is its
        default (a field that takes null keeps it)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or _takes_null(fields[k])}


class StreamOptions(ClientBody):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's and SGLang's: every chunk carries the usage so far


class Bootstrap(ClientBody):
    """PD disaggregation: sglang-router adds these to a request it sends to a prefill and a decode server (lists,
    one room per completion, for a chat request with n > 1: PDRouting.route refuses those by name)."""
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None


class SamplingFields(Bootstrap):
    """Fields shared by completions and chat completions. Their numbers are JSON numbers only (Strict*), as
    OpenAI's API has them: "0.5", true or (for an integer) 2.0 is a 400; lax pydantic read true as 1."""
    model: str | None = None  # None or "default" (SGLang's examples): the served model
    rid: str | None = Field(None, min_length=1)  # SGLang's: the request's id (/abort_request takes it); else made
    n: StrictInt = Field(1, ge=1, le=128)
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    seed: StrictInt | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None  # vLLM's and SGLang's extension
    min_tokens: StrictInt | None = None  # vLLM's extension (SGLang's native min_new_tokens)
    logit_bias: dict[str, StrictFloat] | None = None  # token id (as a string) -> bias in [-100, 100]
    stop: str | list[str] | None = None
    include_stop_str_in_output: StrictBool = False  # vLLM's extension
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    routed_dp_rank: StrictInt | None = None
    # vLLM's extension: logprob tokens as "token_id:N", so that clients get exact ids.
    return_tokens_as_token_ids: StrictBool = False
    skip_special_tokens: StrictBool = True  # vLLM's and SGLang's: false keeps special tokens in the text
    # Structured output: OpenAI's response_format, and SGLang's regex / ebnf (extra_body).
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None

    # Rules between two fields are field validators of the later one (it sees the earlier in info.data), so that
    # an error's param names the field that breaks the rule instead of the body.
    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream", False):
            raise ValueError("stream_options needs stream: true (OpenAI's rule)")
        return options


class CompletionRequest(SamplingFields):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: str | None = None  # refused when given: ignoring it would answer a different question
    best_of: StrictInt | None = None
    add_special_tokens: StrictBool = True  # vLLM's: false encodes text prompts without the tokenizer's BOS

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("fill-in-the-middle (a suffix) is not supported")
        return suffix

    @property
    def prompt_count(self) -> int:
        """Prompts in the request (a string or a list of token ids is one), counted before tokenizing."""
        one = isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int)
        return 1 if one else len(self.prompt)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")  # (absent when n itself was refused)
        if best_of is not None and n is not None and best_of != n:
            raise ValueError(f"best_of must equal n ({n}): candidates are not ranked, got {best_of}")
        return best_of


ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = Literal["none", "minimal", "low", "medium", "high", "xhigh"]  # OpenAI's


class ContentPart(ClientBody):
    type: Literal["text"]
    text: str


class ChatMessage(ClientBody):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any, info: ValidationInfo) -> Any:
        """One readable error for a part that is not text (pydantic's names each member of the union); an earlier
        assistant turn's refusal part (OpenAI's) is its text."""
        if isinstance(content, list) and info.data.get("role") == "assistant":
            content = [{"type": "text", "text": part["refusal"]} if isinstance(part, dict) and part.get("type") ==
                       "refusal" and isinstance(part.get("refusal"), str) else part for part in content]
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":  # dropping an image or audio part would answer a different question
                raise ValueError(f"content[{j}]: parts of type {kind!r} are not supported: this model reads text")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content[{j}]: a text part needs its text (a string)")
        return content

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # (an assistant's may be tool calls only)
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return role

    def plain(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ChatInput(ClientBody):
    """What a chat prompt is made of (chat completions and /tokenize). Tools stay plain dicts: the
    DeepSeek-V3.2 encoding writes them out with their keys in the client's order."""
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True  # vLLM's: false ends the prompt after the last message
    continue_final_message: StrictBool = False  # vLLM's: the reply continues the last message (no end of turn)
    reasoning_effort: REASONING_EFFORTS | None = None  # OpenAI's: the template's thinking switch

    def template_kwargs(self) -> dict[str, Any] | None:
        """The chat template's variables (render.thinking_kwargs)."""
        return thinking_kwargs(self.chat_template_kwargs, self.reasoning_effort)


class ChatCompletionRequest(ChatInput, SamplingFields):
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None  # false: at most one call (the grammar, or the first parsed)
    separate_reasoning: StrictBool = True  # SGLang's: false leaves the reasoning in content (no reasoning parser)
    stream_reasoning: StrictBool = True  # SGLang's: false streams the reasoning in one piece once it has ended
    # the most tokens the reasoning takes before </think> is forced (a prompt that opens reasoning); vLLM's name too
    thinking_budget: StrictInt | None = Field(None, ge=0, validation_alias=AliasChoices("thinking_budget",
                                                                                        "thinking_token_budget"))
    functions: Any = None  # OpenAI's deprecated forms of tools / tool_choice: refused by name
    function_call: Any = None

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:  # (answering without them would answer a different question)
            raise ValueError(f"{info.field_name} is OpenAI's deprecated form of "
                             f"{'tools' if info.field_name == 'functions' else 'tool_choice'}: send that instead")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs", False):  # silently no log-probabilities would surprise
            raise ValueError("top_logprobs needs logprobs: true")
        return top_logprobs


class TokenizeRequest(ClientBody):
    """vLLM's /tokenize: a prompt, or a conversation rendered as chat completions would render it."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" leaves the tools out, as chat completions does
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: REASONING_EFFORTS | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = True  # prompts only: a rendered conversation carries its own
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(ClientBody):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


# -- responses ---------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None  # where a reasoning parser splits the reply


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None  # SGLang's: the stop string or token id that ended it


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """A streamed tool call: the first delta of a call has id, type and name; later ones arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return {k: v for k, v in out.items() if v is not None}


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None  # SGLang's: the stop string or token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None  # SGLang's: the stop string or token id that ended it


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsaserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> UsageInfo:
    details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                     completion_tokens_details=details)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    import json
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"
