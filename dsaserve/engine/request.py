"""Request, SamplingParams, finish reasons (the stop rules: stop_reason) and the request state machine."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np

from dsaserve.cache.pages import PageMirror
from dsaserve.chat.grammar import commit_tokens
from dsaserve.engine.thinking import ThinkingBudget, ThinkingProgress

if TYPE_CHECKING:
    from dsaserve.chat.grammar import GrammarSpec
    from dsaserve.engine.tokenizer import Tokenizer


class RequestError(ValueError):
    """Bad input: the request is rejected with this message; the engine keeps serving."""


class QueueFull(RequestError):
    """The scheduler's queue holds --max-queued-requests already (the server answers 503)."""


def logit_bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({token id or its string: bias}, or (id, bias) pairs) as sorted (id, bias) pairs;
    keys naming the same token ("5", "05") add up."""
    merged: dict[int, float] = {}
    for key, value in (bias.items() if isinstance(bias, dict) else bias):
        # int() also reads "1_0", " 7", "+7" and non-ASCII digits: a key is an int or the id in ASCII digits (a
        # leading "-" is read too, so that validate() names a negative id as such)
        plain = isinstance(key, str) and key.isascii() and key.removeprefix("-").isdigit()
        try:
            if not plain and (isinstance(key, bool) or not isinstance(key, Integral)):
                raise ValueError
            token = int(key)
        except ValueError:  # (also a string of more digits than Python converts)
            message = f"logit_bias keys must be token ids, got {key!r} (an id in plain decimal digits)"
            raise RequestError(message) from None
        try:
            merged[token] = merged.get(token, 0.0) + float(value)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias values must be numbers, got {value!r} for token {token}") from None
    return tuple(sorted(merged.items()))


# Seeds the sampler tells apart: it hashes a seed mod 2^64 (sampler.step_seed), so these 2^64 (vLLM's range, a
# signed 64-bit integer) each draw their own tokens, and a seed outside would repeat one of them.
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion `index` of n (s, s + 1, ...), wrapped into [SEED_MIN, SEED_MAX]: the same value mod
    2^64, so the same tokens as s + index. A seed outside the range stays as it is, for validate() to refuse."""
    if seed is None or isinstance(seed, bool) or not isinstance(seed, Integral) or not SEED_MIN <= seed <= SEED_MAX:
        return seed
    return (seed + index - SEED_MIN) % 2 ** 64 + SEED_MIN


GREEDY_BELOW = 1e-5  # a temperature under this is greedy (vLLM's rule; it was sampled at 1e-5, near ties split)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and output (HF / vLLM's rule)
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False  # keep a matched stop string in the text (vLLM's, SGLang's no_stop_trim)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: plus the n best
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    grammar: GrammarSpec | None = None  # constrained decoding (structured output, forced tool calls)
    thinking_budget: ThinkingBudget | None = None  # the reasoning its prompt opened ends within this many tokens
    skip_special_tokens: bool = True  # the frontend's detokenizing: False keeps special tokens in the text

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "logit_bias", logit_bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def validate(self) -> None:
        self._check_types()
        bad_bias = [(t, b) for t, b in self.logit_bias if t < 0 or not -100.0 <= b <= 100.0]
        checks = [
            (self.max_tokens is None or self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}"),
            (0.0 <= self.temperature < math.inf, f"temperature must be >= 0 and finite, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got "
                                                    f"{self.frequency_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (0.0 < self.repetition_penalty <= 2.0,
             f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"),
            (self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             f"min_tokens must be in [0, max_tokens] (/generate: min_new_tokens, max_new_tokens), got "
             f"{self.min_tokens} with max_tokens {self.max_tokens}"),
            (not bad_bias, "logit_bias maps token ids >= 0 to biases in [-100, 100] (keys naming one token add "
                           f"up), got {bad_bias[0][0]}: {bad_bias[0][1]}" if bad_bias else ""),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, f"seed must be a signed 64-bit integer, in "
             f"[{SEED_MIN}, {SEED_MAX}] (the sampler tells 2^64 seeds apart), got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.thinking_budget is None or isinstance(self.thinking_budget, ThinkingBudget)
             and self.thinking_budget.tokens >= 0, f"thinking_budget must be a ThinkingBudget of tokens >= 0, got "
             f"{self.thinking_budget!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    def _check_types(self) -> None:
        """Numbers of the right kind (the Python API takes anything): 2.5 tokens or a temperature of "0.5" is a
        RequestError naming the field, not a TypeError from deep inside the sampler."""
        for names, kinds, what in ((_INT_FIELDS, (Integral,), "an integer"), (_OPTIONAL_INT_FIELDS,
                                   (Integral, type(None)), "an integer or None"), (_FLOAT_FIELDS, (Real,), "a number")):
            for name in names:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, kinds):
                    raise RequestError(f"{name} must be {what}, got {value!r}")
        if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be integers, got {list(self.stop_token_ids)}")
        for name in ("ignore_eos", "include_stop_str", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be True or False, got {getattr(self, name)!r}")
        from dsaserve.chat.grammar import GrammarSpec  # (no torch, no cycle: only its type hints name Request)
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise RequestError(f"grammar must be a GrammarSpec (dsaserve.chat.grammar.checked_spec), got "
                               f"{type(self.grammar).__name__}")


_INT_FIELDS = ("top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")  # None: see each field
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


def _as_tuple(value: Any, name: str) -> tuple:
    """A SamplingParams list field as a tuple: None is empty, one string is a list of one (stop)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise RequestError(f"{name} must be a list, got {value!r}") from None


def check_token_ids(prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """Every token id a request names (prompt, logit_bias, stop_token_ids) is in [0, vocab_size): an id
    outside it is a client's mistake (another tokenizer's ids), said by name."""
    # (each message opens with what names the field: "the prompt ..." or a SamplingParams field, streaming.field_error)
    for message, ids in (("the prompt has token id {}, outside", prompt_ids),
                         ("logit_bias token id {} is outside", [t for t, _ in params.logit_bias]),
                         ("stop_token_ids token id {} is outside", params.stop_token_ids),
                         ("thinking_budget's end token id {} is outside",
                          [params.thinking_budget.end_id] if params.thinking_budget else [])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"{message.format(bad[0])} the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class FinishReason:
    kind: str  # "stop" | "length" | "abort" | "error"
    matched: int | str | None = None  # the eos / stop token id or stop string that ended it
    message: str | None = None  # why, for abort and error
    status: int = 500  # an error's HTTP status: 400 where the request caused it (its constraint), and in PD the
    # other server's where it refused the request (400, 503, ...)
    code: str | None = None  # an error's API code where one is known (a PD peer's refusal: "queue_full", ...)




class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"  # PD: holds pages while its KV cache moves (prefill: out, decode: in)
    FINISHED = "finished"


@dataclass(frozen=True)
class DisaggRoute:
    """A request's prefill/decode pairing: the router's bootstrap room and, on the decode side, the
    control endpoint of the prefill DP leader that holds it (None on the prefill side)."""
    room: int
    prefill_control: str | None = None


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival: int  # admission order; retraction evicts the newest
    seed: int
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose latent and index key are in the pool
    cached_tokens: int = 0  # of the prompt, served from the prefix cache at its first admission
    admitted: bool = False  # once (a retracted request is admitted again: its cached_tokens stand)
    state: RequestState = RequestState.WAITING
    finish: FinishReason | None = None
    stop_text: str | None = None  # the completion text truncated before (or after) a matched stop string
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # prompt[1:]
    draft_ids: list[int] = field(default_factory=list)  # MTP drafts to verify in the next step
    spec_verify_ct: int = 0  # verify steps this request took part in
    spec_accepted: int = 0  # draft tokens accepted over those steps
    grammar: Any = None  # GrammarState of params.grammar, made by the sampler on the leader
    grammar_compile: Any = None  # the Future of that state, compiling beside the step loop (engine/grammar_compile)
    min_tokens_banned: tuple[int, ...] = ()  # EOS and stop token ids, masked before params.min_tokens
    min_tokens_chars: int | None = None  # characters of the first params.min_tokens output tokens, once known
    sampling_tensors: dict[str, Any] = field(default_factory=dict)  # the sampler's fixed per-request tensors
    thinking: ThinkingProgress | None = None  # params.thinking_budget's progress (the sampler's)
    disagg: DisaggRoute | None = None  # PD: the request's KV cache moves between servers
    inflight: int = 0  # overlapped scheduling: tokens sampled on the device, not committed yet
    page_mirror: PageMirror = field(default_factory=PageMirror, repr=False)

    def page_ids(self) -> np.ndarray:
        """`pages` as int32, for a step's plan (PageMirror)."""
        return self.page_mirror.view(self.pages)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation (hot path)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0):end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled (1 when decoding; an in-flight token
        counts: the next step feeds it)."""
        return self.num_tokens + self.inflight - self.num_cached

    def ends_with_inflight(self, context_length: int) -> bool:
        """Its in-flight token is its last by length (max_new_tokens or the context): no more steps."""
        return bool(self.inflight) and (len(self.output_ids) + self.inflight >= self.max_new_tokens
                                        or self.num_tokens + self.inflight >= context_length)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(slots=True)  # not frozen: made for every running request every step, and frozen init is 3x slower
class RequestOutput:
    """What one step produced for one request (deltas; the final one carries `finish`)."""
    rid: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, list[tuple[int, float]]]]
    prompt_tokens: int
    completion_tokens: int
    finish: FinishReason | None = None
    stop_text: str | None = None
    spec_verify_ct: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # with the first token

    @property
    def finished(self) -> bool:
        return self.finish is not None


def _shown_tail(ids: list[int], count: int, special: frozenset[int]) -> list[int]:
    """The shortest tail of `ids` holding `count` tokens the text shows (special tokens decode to nothing, so a
    run of them inside a stop string must not push its start out of the window)."""
    start, shown = len(ids), 0
    while start > 0 and shown < count:
        start -= 1
        shown += ids[start] not in special
    return ids[start:]


def stop_reason(req: Request, token: int, tokenizer: Tokenizer, eos_ids: frozenset[int],
                context_length: int, grammar_done: bool = False) -> FinishReason | None:
    """Why `req` stops after its newest token `token` (already in output_ids), or None: a stop token or EOS, a
    stop string (req.stop_text: the text up to it, or through it with include_stop_str; a stop token's text is
    left out too, as vLLM and SGLang do), its length. `grammar_done`: the request's grammar was complete before
    `token` (it allows only EOS then): the token ends it as EOS does, ignore_eos or not."""
    p = req.params
    if grammar_done or token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
        if not p.include_stop_str and (not p.skip_special_tokens or token not in tokenizer.special_ids):
            req.stop_text = tokenizer.decode(req.output_ids[:-1], p.skip_special_tokens)  # its text shows: cut it
        return FinishReason("stop", matched=token)
    if p.stop and len(req.output_ids) >= p.min_tokens:
        skip = p.skip_special_tokens  # the text the client sees: stop strings match it, stop_text cuts it
        window = max(len(s.encode()) for s in p.stop) + 8  # tokens: each decodes to >= 1 byte (byte-level BPE)
        tail = tokenizer.decode(_shown_tail(req.output_ids, window, tokenizer.special_ids if skip else frozenset()),
                                skip).rstrip("\ufffd")  # (a character still arriving byte by byte matches nothing)
        matched = [s for s in p.stop if s in tail]
        if matched:
            text = tokenizer.decode(req.output_ids, skip).rstrip("\ufffd")
            # with min_tokens (vLLM's rule) only a match that ends after the first min_tokens tokens counts
            if p.min_tokens and req.min_tokens_chars is None:  # those tokens never change: decode them once
                # (a character those tokens leave half spelled is not text yet: vLLM holds it back too)
                req.min_tokens_chars = len(tokenizer.decode(req.output_ids[:p.min_tokens], skip).rstrip("\ufffd"))
            floor = req.min_tokens_chars or 0
            hits = {s: text.find(s, max(0, floor - len(s) + 1)) for s in matched}
            hits = {s: i for s, i in hits.items() if i >= 0}
            if hits:
                first = min(hits, key=lambda s: hits[s])
                req.stop_text = text[:hits[first] + (len(first) if p.include_stop_str else 0)]
                return FinishReason("stop", matched=first)
            if not p.min_tokens:  # in the tail's decoding only: stop there, keep the text
                req.stop_text = text
                return FinishReason("stop", matched=matched[0])
    if len(req.output_ids) >= req.max_new_tokens or req.num_tokens >= context_length:
        return FinishReason("length")
    return None


def append_until_stop(req: Request, tokens: list[int], tokenizer: Tokenizer, eos_ids: frozenset[int],
                      context_length: int, stops: bool = True) -> tuple[list[int], FinishReason | None]:
    """Append `tokens` to the request (and its grammar) up to the first that stops it (stop_reason); returns the
    tokens appended and why it ends, or None. `stops` False: no stop rule applies (a prefill server's PD request:
    the decode server applies them to the token it hands over). A grammar that failed ends it with an error."""
    new, reason = [], None
    for token in tokens:
        # a complete grammar allows only EOS: that token ends the request even with ignore_eos (as SGLang)
        done = req.grammar is not None and req.grammar.is_terminated
        req.output_ids.append(token)
        new.append(token)
        commit_tokens(req, [token])
        reason = stop_reason(req, token, tokenizer, eos_ids, context_length, grammar_done=done) if stops else None
        if reason is not None:
            break
    failure = req.grammar.failure() if req.grammar is not None else None
    if failure is not None:  # llguidance gave up (a lexer limit): not a stop, whatever the last token was
        reason = FinishReason("error", message=f"the output constraint failed: {failure}", status=400)
    return new, reason
