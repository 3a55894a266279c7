"""LLM: the offline, in-process API."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
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


class LLM:
    """`LLM(model_path, **server_args).generate(prompts, SamplingParams)` runs in this process (tp == 1)."""

    def __init__(self, model_path: str | None = None, progress: bool = False, **kwargs: Any):
        args = ServerArgs(model_path=model_path, **kwargs)
        if args.tp != 1:
            raise ValueError("LLM runs in-process with tp == 1; use `dsaserve serve --tp N` for parallel ranks")
        self.engine = Engine(args, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Prompts as text or token-id lists; one SamplingParams for all or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
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
        results: dict[str, Any] = {}
        for out in self.engine.run_until_idle():
            tokens[out.rid] += out.new_token_ids
            logprobs[out.rid] += out.new_logprobs
            if out.finished:
                results[out.rid] = out
        completions = []
        for rid in rids:
            out = results[rid]
            text = out.stop_text if out.stop_text is not None else self.tokenizer.decode(tokens[rid])
            completions.append(Completion(text, tokens[rid], out.finish, out.prompt_tokens, logprobs[rid]))
        return completions
