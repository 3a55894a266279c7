"""Scheduler: admission, chunked prefill, decode and retraction under memory pressure -> StepPlan.

Policy: prefill first (as SGLang does by default). A step either prefills chunks of requests, at
most `chunked_prefill_size` tokens, or decodes every running request by one token. When the pool
cannot hold the next decode step, the newest running request is retracted: its pages are freed and
it waits again with the tokens it already produced, to be prefilled again later.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from dsaserve.cache.pages import PageAllocator
from dsaserve.engine.layout import StepMode, StepPlan
from dsaserve.engine.request import Request, RequestError, RequestState


class QueueFull(RequestError):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    chunked_prefill_size: int
    max_running_requests: int
    max_queued_requests: int
    context_length: int


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: PageAllocator):
        self.cfg, self.allocator = cfg, allocator
        self.waiting: list[Request] = []  # by arrival
        self.running: list[Request] = []  # by arrival
        self.num_retractions = 0
        self._hold_admission = False  # after a retraction: the pool is over-committed until one finishes

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.capacity * self.cfg.page_size

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Reject what can never run: the message names both numbers."""
        limit = self.cfg.context_length
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len >= limit:
            raise RequestError(f"the prompt has {prompt_len} tokens but the context length is {limit}")
        if prompt_len + max_new_tokens > limit:
            raise RequestError(f"prompt ({prompt_len} tokens) + max_tokens ({max_new_tokens}) = "
                               f"{prompt_len + max_new_tokens} exceeds the context length {limit}")
        if prompt_len + max_new_tokens > self.capacity_tokens:
            raise RequestError(f"prompt ({prompt_len}) + max_tokens ({max_new_tokens}) needs more cache than "
                               f"the whole KV pool holds ({self.capacity_tokens} tokens)")

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.cfg.max_queued_requests:
            raise QueueFull(f"the queue is full ({self.cfg.max_queued_requests} requests waiting)")
        self.check_fits(len(req.prompt_ids), req.max_new_tokens)
        self._enqueue(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and return its pages (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.free(req.pages)
        req.pages = []
        req.state = RequestState.FINISHED
        self._hold_admission = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        for _ in range(len(self.running) + 1):
            plan = self._prefill_plan() or self._decode_plan()
            if plan is not None or not self.running:
                return plan
            self._retract(self.running[-1])  # nothing can run: every running request waits on pages
        return None

    def advance(self, plan: StepPlan, requests: dict[str, Request]) -> None:
        for rid, q in zip(plan.rids, plan.q_lens):
            requests[rid].num_cached += q

    # -- internals ---------------------------------------------------------------------------

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def _prefilling(self, req: Request) -> bool:
        return req.pending > 1 or req.num_cached == 0

    def _prefill_plan(self) -> StepPlan | None:
        budget, chosen = self.cfg.chunked_prefill_size, []
        free = self.allocator.num_free
        decoding = sum(1 for r in self.running if not self._prefilling(r))
        for req in [r for r in self.running if self._prefilling(r)] + list(self.waiting):
            admitting = req.state is RequestState.WAITING
            if admitting and (len(self.running) >= self.cfg.max_running_requests
                              or (self._hold_admission and self.running)):
                break
            # Every chunk leaves a page per decoding request (and, when admitting, one for this request's
            # first decode), so a prefill never takes the pages the next decode step needs (no thrash).
            usable = free - decoding - (1 if admitting else 0)
            room = (len(req.pages) + max(usable, 0)) * self.cfg.page_size - req.num_cached
            chunk = min(req.pending, budget, room)
            if chunk <= 0:
                break
            new_pages = self._pages_for(req.num_cached + chunk) - len(req.pages)
            req.pages += self.allocator.alloc(new_pages)
            free -= new_pages
            if admitting:
                self.waiting.remove(req)
                req.state = RequestState.RUNNING
                bisect.insort(self.running, req, key=lambda r: r.arrival)
            chosen.append((req, chunk))
            budget -= chunk
            if budget == 0:
                break
        return self._plan(StepMode.EXTEND, chosen) if chosen else None

    def _decode_plan(self) -> StepPlan | None:
        while True:
            batch = [r for r in self.running if not self._prefilling(r)]
            if not batch:
                return None
            needy = [r for r in batch if self._pages_for(r.num_cached + 1) > len(r.pages)]
            if len(needy) <= self.allocator.num_free:
                break
            self._retract(self.running[-1])
        for req in needy:
            req.pages += self.allocator.alloc(1)
        return self._plan(StepMode.DECODE, [(r, 1) for r in batch])

    def _plan(self, mode: StepMode, chosen: list[tuple[Request, int]]) -> StepPlan:
        input_ids: list[int] = []
        for req, q in chosen:
            input_ids += req.token_slice(req.num_cached, req.num_cached + q)
        return StepPlan(
            mode=mode, rids=tuple(r.rid for r, _ in chosen), pages=tuple(tuple(r.pages) for r, _ in chosen),
            prefix_lens=tuple(r.num_cached for r, _ in chosen), q_lens=tuple(q for _, q in chosen),
            samples=tuple(r.num_cached + q == r.num_tokens for r, q in chosen), input_ids=tuple(input_ids))

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.pages)
        req.pages, req.num_cached = [], 0
        self.num_retractions += 1
        self._hold_admission = True
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        req.state = RequestState.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)
