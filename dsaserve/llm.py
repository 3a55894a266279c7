"""LLM: the offline, in-process API."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Sequence

from dsaserve.engine.engine import Engine
from dsaserve.engine.request import FinishReason, SamplingParams
from dsaserve.server_args import ServerArgs


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    # SamplingParams.prompt_logprobs: each prompt token's after the first (None when not asked for)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class LLM:
    """`LLM(model_path, **server_args).generate(prompts, SamplingParams)` runs in this process (tp == 1)."""

    def __init__(self, model_path: str | None = None, progress: bool = False, **kwargs: Any):
        args = ServerArgs(model_path=model_path, **kwargs)
        if args.tp != 1:
            raise ValueError("LLM runs in-process with tp == 1; use `dsaserve serve --tp N` for parallel ranks")
        if args.disaggregation_mode != "null":
            raise ValueError("LLM runs whole requests: disaggregation_mode must be 'null' (PD disaggregation is "
                             "`dsaserve serve --disaggregation-mode prefill|decode`)")
        from dsaserve.server.preflight import checked_args
        self.engine = Engine(checked_args(args), progress=progress)  # serve's checks (--context-length ...) first
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Prompts as text or token-id lists; one SamplingParams for all or one per prompt."""
        prompts = _prompt_list(prompts)
        params = SamplingParams() if params is None else params
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        wrong = [p for p in per_prompt if not isinstance(p, SamplingParams)]
        if wrong:
            raise TypeError(f"params must be SamplingParams (or a list of them), got {type(wrong[0]).__name__}")
        rids = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, ids, p)
                rids.append(rid)
        except Exception:
            for rid in rids:  # a bad prompt rejects the whole call; nothing stays queued
                self.engine.abort(rid)
            self.engine.run_until_idle()
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in rids}
        logprobs: dict[str, list] = {rid: [] for rid in rids}
        scored: dict[str, list | None] = {rid: None for rid in rids}
        results: dict[str, Any] = {}
        for out in self.engine.run_until_idle():
            tokens[out.rid] += out.new_token_ids
            logprobs[out.rid] += out.new_logprobs
            if out.prompt_logprobs is not None:
                scored[out.rid] = out.prompt_logprobs
            if out.finished:
                results[out.rid] = out
        completions = []
        for rid, p in zip(rids, per_prompt):
            out = results[rid]
            text = out.stop_text if out.stop_text is not None else self.tokenizer.decode(
                tokens[rid], p.skip_special_tokens)
            completions.append(Completion(text, tokens[rid], out.finish, out.prompt_tokens, logprobs[rid],
                                          scored[rid]))
        return completions


def _prompt_list(prompts: Any) -> list[str | list[int]]:
    """One prompt (text, or a sequence of token ids: a list, a tuple, a numpy array, a range) or a sequence of
    them, as a list; anything else is a TypeError naming it."""
    def many(p: Any) -> bool:  # a sequence other than text and bytes
        return not isinstance(p, (str, bytes, bytearray)) and hasattr(p, "__len__") and hasattr(p, "__iter__")

    def token_ids(p: Any) -> bool:
        return many(p) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in p)

    if isinstance(prompts, str) or (many(prompts) and len(prompts) and isinstance(next(iter(prompts)), Integral)):
        prompts = [prompts]
    if not many(prompts):
        raise TypeError(f"prompts must be a string, token ids, or a list of either, got {type(prompts).__name__}"
                        + (" (bytes are not prompts)" if isinstance(prompts, (bytes, bytearray)) else ""))
    bad = [p for p in prompts if not (isinstance(p, str) or token_ids(p))]
    if bad:
        raise TypeError(f"a prompt must be a string or a sequence of token ids (ints), got {type(bad[0]).__name__}"
                        + (" (bytes are not prompts)" if isinstance(bad[0], (bytes, bytearray)) else ""))
    return [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
