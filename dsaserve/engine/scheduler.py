"""Scheduler: admission, chunked prefill, decode and retraction under memory pressure -> StepPlan.

Policy: prefill first (as SGLang does by default). A step either prefills chunks of requests, at
most `chunked_prefill_size` tokens, or decodes every running request: by one token, or with
speculative decoding (S draft steps) by verifying its last token and S drafts (q_len S + 1). When
the pool cannot hold the next decode step, the newest running request is retracted: its pages are
freed and it waits again with the tokens it already produced, to be prefilled again later.

Pages cover every slot a step writes: a verify step writes S + 1 rows from num_cached and its
chained draft steps reach S - 1 positions past the accepted run, so a decoding request holds pages
for num_cached + 2S tokens (num_cached + 1 without speculation); the last chunk of a prompt adds the
S - 1 draft positions after it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from dsaserve.cache.pages import PageAllocator
from dsaserve.engine.layout import DUMMY_RID, StepMode, StepPlan
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
    spec_steps: int = 0  # S draft steps per verify; 0: no speculative decoding

    @property
    def decode_lookahead(self) -> int:
        """Tokens past num_cached that one decode step may write (verify rows and chained drafts)."""
        return 2 * self.spec_steps if self.spec_steps else 1


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
        slack = self.cfg.decode_lookahead - 1  # speculative steps write a few slots past the last token
        if prompt_len + max_new_tokens + slack > self.capacity_tokens:
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

    # -- PD disaggregation: requests whose KV cache moves between servers ----------------------

    def preallocate(self, req: Request, tokens: int) -> bool:
        """Decode side: give a request pages for `tokens` (its prompt) that a prefill server will fill,
        leaving what the running requests' next decode step needs. False when they do not fit now."""
        need = self._pages_for(tokens)
        reserve = sum(self._pages_missing(r, r.num_cached + self.cfg.decode_lookahead)
                      for r in self.running if not self._prefilling(r))
        if self.allocator.num_free - reserve < need:
            return False
        req.pages = self.allocator.alloc(need)
        req.state = RequestState.TRANSFERRING
        return True

    def resume(self, req: Request, num_cached: int) -> None:
        """Decode side: the request's KV cache arrived; it decodes from num_cached on."""
        req.num_cached = num_cached
        req.state = RequestState.RUNNING
        bisect.insort(self.running, req, key=lambda r: r.arrival)

    def park(self, req: Request) -> None:
        """Prefill side: the request stops running but keeps its pages while they are sent."""
        self.running.remove(req)
        req.state = RequestState.TRANSFERRING

    def schedule(self) -> StepPlan | None:
        for _ in range(len(self.running) + 1):
            plan = self._prefill_plan() or self._decode_plan()
            if plan is not None or not self.running:
                return plan
            self._retract(self.running[-1])  # nothing can run: every running request waits on pages
        return None

    def advance(self, plan: StepPlan, requests: dict[str, Request], rows_kept: list[int] | None = None) -> None:
        """The plan's requests now hold their first rows_kept[b] rows in the cache (all rows when None;
        a verify step keeps the accepted run). Dummy requests hold nothing."""
        for b, (rid, prefix, q) in enumerate(zip(plan.rids, plan.prefix_lens, plan.q_lens)):
            if rid != DUMMY_RID:
                requests[rid].num_cached = prefix + (q if rows_kept is None else rows_kept[b])

    # -- internals ---------------------------------------------------------------------------

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def _prefilling(self, req: Request) -> bool:
        """Still feeding known tokens (with speculation: until its prompt's last chunk made its drafts)."""
        return req.pending > 1 or req.num_cached == 0 or (self.cfg.spec_steps > 0 and not req.draft_ids)

    def _pages_missing(self, req: Request, tokens: int) -> int:
        return max(self._pages_for(tokens) - len(req.pages), 0)

    def _prefill_plan(self) -> StepPlan | None:
        budget, chosen = self.cfg.chunked_prefill_size, []
        free, drafts = self.allocator.num_free, max(self.cfg.spec_steps - 1, 0)
        # Every chunk leaves the pages the next decode step of each decoding request needs (and, when
        # admitting, one request's first decode), so a prefill never takes them (no thrash).
        reserve = sum(self._pages_missing(r, r.num_cached + self.cfg.decode_lookahead)
                      for r in self.running if not self._prefilling(r))
        first_decode = self._pages_for(self.cfg.decode_lookahead)
        for req in [r for r in self.running if self._prefilling(r)] + list(self.waiting):
            admitting = req.state is RequestState.WAITING
            if admitting and (len(self.running) >= self.cfg.max_running_requests
                              or (self._hold_admission and self.running)):
                break
            usable = free - reserve - (first_decode if admitting else 0)
            room = (len(req.pages) + max(usable, 0)) * self.cfg.page_size - req.num_cached
            chunk = min(req.pending, budget, room)
            if chunk == req.pending and room < chunk + drafts:
                chunk = min(req.pending - 1, room)  # the last chunk also needs its first drafts' slots
            if chunk <= 0:
                break
            new_pages = self._pages_missing(req, req.num_cached + chunk + (drafts if chunk == req.pending else 0))
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
        ahead = self.cfg.decode_lookahead
        while True:
            batch = [r for r in self.running if not self._prefilling(r)]
            if not batch:
                return None
            if sum(self._pages_missing(r, r.num_cached + ahead) for r in batch) <= self.allocator.num_free:
                break
            self._retract(self.running[-1])
        for req in batch:
            req.pages += self.allocator.alloc(self._pages_missing(req, req.num_cached + ahead))
        spec = self.cfg.spec_steps
        return self._plan(StepMode.VERIFY if spec else StepMode.DECODE, [(r, 1 + spec) for r in batch])

    def _plan(self, mode: StepMode, chosen: list[tuple[Request, int]]) -> StepPlan:
        input_ids: list[int] = []
        for req, q in chosen:
            if mode is StepMode.VERIFY:  # the last accepted token, then the drafts of the last step
                assert len(req.draft_ids) == q - 1, f"request {req.rid} has {len(req.draft_ids)} drafts, not {q - 1}"
                input_ids += req.token_slice(req.num_cached, req.num_cached + 1) + req.draft_ids
            else:
                input_ids += req.token_slice(req.num_cached, req.num_cached + q)
        logits = [q if mode is StepMode.VERIFY else int(r.num_cached + q == r.num_tokens) for r, q in chosen]
        return StepPlan(
            mode=mode, rids=tuple(r.rid for r, _ in chosen), pages=tuple(tuple(r.pages) for r, _ in chosen),
            prefix_lens=tuple(r.num_cached for r, _ in chosen), q_lens=tuple(q for _, q in chosen),
            logit_counts=tuple(logits), input_ids=tuple(input_ids))

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.pages)
        req.pages, req.num_cached, req.draft_ids = [], 0, []
        self.num_retractions += 1
        self._hold_admission = True
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        req.state = RequestState.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)
