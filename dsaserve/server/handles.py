"""One engine request as the routes see it: an accept future and a queue of text deltas.

Detokenization runs in the frontend's detokenizer thread (`detokenize`), never on the event loop;
only that thread touches a handle's detokenizer state.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from dsaserve.engine.request import FinishReason, RequestOutput, SamplingParams
from dsaserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from dsaserve.server.errors import ApiError
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server.request_log import RequestLog

log = logging.getLogger(__name__)


class EngineFailure(Exception):
    """The deployment serving a request failed: the request ends with this message (503)."""


@dataclass
class Delta:
    """New output of one request, or (absorbing the later ones in order) all of it so far."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spec_verify_ct: int = 0  # verify steps so far (MTP speculative decoding)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # once, with the first tokens

    @staticmethod
    def of(out: RequestOutput, text: str) -> Delta:
        return Delta(text, list(out.new_token_ids), list(out.new_logprobs), out.finish, out.prompt_tokens,
                     out.completion_tokens, out.spec_verify_ct, out.cached_tokens, out.prompt_logprobs)

    def absorb(self, later: Delta) -> None:
        """Append a later delta of the same request: its text, tokens and log-probabilities; its counters and
        finish replace these."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish, self.prompt_tokens = later.finish, later.prompt_tokens
        self.completion_tokens = later.completion_tokens
        self.spec_verify_ct, self.cached_tokens = later.spec_verify_ct, later.cached_tokens
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs


class RequestHandle:
    def __init__(self, rid: str, rank: int, tokenizer: Tokenizer, params: SamplingParams, group: str | None = None,
                 scores_only: bool = False, room: int | None = None, arrived: float | None = None):
        self.rid, self.rank, self.group = rid, rank, group  # group: the response id of an n > 1 / batch call
        self.room = room  # PD: its bootstrap room
        self.scores_only = scores_only  # the prompt only (max_tokens 0): the one token it ran for is left out
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue: asyncio.Queue[Delta | EngineFailure] = asyncio.Queue()
        self.finished = False
        # False once another part of its call was refused: the call's answer is that error, so this part (aborted)
        # is no finished generation of the metrics
        self.counted = True
        # TTFT and e2e latency count from the HTTP request's arrival when the route knows it (guard.arrival)
        self.created = self._last = arrived if arrived is not None else time.monotonic()
        self._got_token = False
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._text, self._emitted = "", 0
        # Text that might be the start of a stop string is held back until it cannot be.
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.params, self._tokenizer = params, tokenizer
        self.request_log: RequestLog | None = None  # --log-requests (log_to)
        self._prompt_ids: list[int] = []
        self._logged_text = ""  # the output so far, for the log's level 2 and 3

    def log_to(self, request_log: RequestLog, prompt_ids: list[int]) -> None:
        self.request_log, self._prompt_ids = request_log, list(prompt_ids)

    def accept(self) -> None:
        """The leader took the request (in the frontend's loop, before any of its outputs)."""
        if not self.accepted.done():  # (cancelled when the client left before the answer: its abort follows)
            self.accepted.set_result(None)
        if self.request_log is not None:
            self.request_log.accepted(self.rid, self.rank, self._prompt_ids, self.params, self._tokenizer)

    def detokenize(self, out: RequestOutput) -> Delta:
        """The output as a text delta (called in the detokenizer thread, in output order)."""
        if self.scores_only:
            ended = out.finish is not None and out.finish.kind in ("stop", "length")
            return Delta(finish=FinishReason("length") if ended else out.finish, prompt_tokens=out.prompt_tokens,
                         cached_tokens=out.cached_tokens, prompt_logprobs=out.prompt_logprobs)
        return Delta.of(out, self._text_delta(out))

    def on_output(self, delta: Delta, metrics: ServerMetrics) -> None:
        now = time.monotonic()
        if delta.token_ids and self.counted:
            metrics.observe_tokens(len(delta.token_ids), now - self._last, first=not self._got_token)
            self._got_token, self._last = True, now
        if delta.finish is not None:
            self.finished = True
            if self.counted:
                metrics.observe_finish(delta.finish.kind, delta.prompt_tokens, now - self.created)
        self._log(delta)
        self.queue.put_nowait(delta)

    def _log(self, delta: Delta) -> None:
        if self.request_log is None:
            return
        if self.request_log.keeps_text:
            self._logged_text += delta.text
        if delta.finish is not None:
            self.request_log.finished(self.rid, delta.finish, delta.prompt_tokens, delta.completion_tokens,
                                      delta.cached_tokens, self.created, self._logged_text)

    def fail(self, message: str) -> None:
        if self.request_log is not None and not self.finished:
            self.request_log.failed(self.rid, message)
        self.finished = True
        if not self.accepted.done():
            self.accepted.set_exception(ApiError(503, message))
        self.queue.put_nowait(EngineFailure(message))

    async def deltas(self) -> AsyncIterator[Delta]:
        """The request's deltas in order; those already waiting when one is taken come merged into it, so a
        consumer that fell behind (a busy frontend, a slow client) catches up in one event, not one per step."""
        failure: EngineFailure | None = None
        while True:
            delta = await self.queue.get()
            if isinstance(delta, EngineFailure):
                raise delta
            while delta.finish is None and not self.queue.empty():
                later = self.queue.get_nowait()
                if isinstance(later, EngineFailure):
                    failure = later  # after what came before it
                    break
                delta.absorb(later)
            yield delta
            if failure is not None:
                raise failure
            if delta.finish is not None:
                return

    def _text_delta(self, out: RequestOutput) -> str:
        self._text += self._detok.add(out.new_token_ids)
        if out.finished:
            final = out.stop_text if out.stop_text is not None else self._text + self._detok.flush()
            piece, self._emitted = final[self._emitted:], len(final)
            return piece
        upto = max(self._emitted, len(self._text) - self._hold)
        piece, self._emitted = self._text[self._emitted:upto], upto
        return piece


def detokenize_outputs(outputs: list[tuple[RequestOutput, RequestHandle]]) -> list[Delta]:
    """In the detokenizer thread: each output's text delta (a failure costs that text, not the loop)."""
    deltas = []
    for out, handle in outputs:
        try:
            deltas.append(handle.detokenize(out))
        except Exception:
            log.exception("could not detokenize the output of %s", out.rid)
            deltas.append(Delta.of(out, ""))
    return deltas
