"""--log-requests (SGLang's flag): one log line when a request is accepted and one when it ends, in the server
process, at the detail --log-requests-level asks (SGLang's levels):

* 0: its id, DP rank, token counts, finish reason and latency;
* 1: and the sampling parameters that differ from the defaults;
* 2: and the first and last CLIP characters of its prompt and output;
* 3: and them whole.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from dsaserve.engine.request import FinishReason, SamplingParams
from dsaserve.engine.tokenizer import Tokenizer

log = logging.getLogger("dsaserve.requests")
CLIP = 256  # characters kept at each end of a prompt or output at level 2
_DEFAULTS = SamplingParams()


@dataclasses.dataclass(frozen=True)
class RequestLog:
    level: int

    @property
    def keeps_text(self) -> bool:
        return self.level >= 2

    def accepted(self, rid: str, rank: int, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None) -> None:
        parts = [f"request {rid} accepted on DP rank {rank}: {len(prompt_ids)} prompt tokens"]
        if self.level >= 1:
            parts.append(f"sampling {sampling_changes(params)}")
        if self.keeps_text and tokenizer is not None:
            parts.append(f"prompt {self._prompt(prompt_ids, tokenizer)!r}")
        log.info("; ".join(parts))

    def _prompt(self, ids: list[int], tokenizer: Tokenizer) -> str:
        """Level 2 decodes only the ends (this runs in the server's event loop; a prompt may be 100K tokens)."""
        if self.level >= 3 or len(ids) <= 2 * CLIP:
            return self._text(tokenizer.decode(ids, skip_special_tokens=False))
        head = tokenizer.decode(ids[:CLIP], skip_special_tokens=False)[:CLIP]
        tail = tokenizer.decode(ids[-CLIP:], skip_special_tokens=False)[-CLIP:]
        return f"{head} ...[{len(ids) - 2 * CLIP} tokens]... {tail}"

    def finished(self, rid: str, finish: FinishReason, prompt_tokens: int, completion_tokens: int, cached: int,
                 started: float, text: str) -> None:
        why = finish.kind + (f" ({finish.message})" if finish.message else "")
        parts = [f"request {rid} finished: {why} after {time.monotonic() - started:.3f} s, {prompt_tokens} prompt "
                 f"tokens ({cached} cached), {completion_tokens} completion tokens"]
        if self.keeps_text:
            parts.append(f"output {self._text(text)!r}")
        log.info("; ".join(parts))

    def failed(self, rid: str, message: str) -> None:
        log.info("request %s failed: %s", rid, message)

    def _text(self, text: str) -> str:
        if self.level >= 3 or len(text) <= 2 * CLIP:
            return text
        return f"{text[:CLIP]} ...[{len(text) - 2 * CLIP} characters]... {text[-CLIP:]}"


def sampling_changes(params: SamplingParams) -> dict[str, Any]:
    """The request's sampling fields that differ from SamplingParams' defaults (a grammar by its kind only)."""
    changed = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if value != getattr(_DEFAULTS, f.name):
            changed[f.name] = type(value).__name__ if f.name == "grammar" else value
    return changed
