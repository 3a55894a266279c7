"""Scheduler: admission, chunked prefill, decode and retraction under memory pressure -> StepPlan.

Policy: a step has a budget of `chunked_prefill_size` tokens. Mixed (the default): every running
request's decode rows, then prompt chunks in the rest of the budget; when the decode rows fill it,
every other step prefills instead, so a prompt never waits for decoders to finish. Without mixed
chunks, prefill first (as SGLang does by default): a step either prefills chunks of requests or
decodes every running request. A decode row is one token, or with speculative decoding (S draft
steps) the last token and S drafts to verify (q_len S + 1). When the pool cannot hold the next
decode step, the newest running request is retracted: its pages are freed and it waits again with
the tokens it already produced, to be prefilled again later.

Pages cover every slot a step writes: a verify step writes S + 1 rows from num_cached and its
chained draft steps reach S - 1 positions past the accepted run, so a decoding request holds pages
for num_cached + 2S tokens (num_cached + 1 without speculation); the last chunk of a prompt adds the
S - 1 draft positions after it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from dsaserve.cache.pages import PageAllocator
from dsaserve.cache.prefix import PrefixCache
from dsaserve.engine.admission import decode_lookahead, pages_to_admit
from dsaserve.engine.layout import DUMMY_RID, IN_FLIGHT, StepMode, StepPlan
from dsaserve.engine.request import QueueFull, Request, RequestError, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    chunked_prefill_size: int
    max_running_requests: int
    max_queued_requests: int
    context_length: int
    spec_steps: int = 0  # S draft steps per verify; 0: no speculative decoding
    max_logit_rows: int = 1 << 30  # most rows of one chunk that scores its prompt (the logits' memory)
    mixed_chunk: bool = False  # decode rows and prefill chunks in the same step

    @property
    def decode_lookahead(self) -> int:
        return decode_lookahead(self.spec_steps)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: PageAllocator, cache: PrefixCache | None = None):
        self.cfg, self.allocator, self.cache = cfg, allocator, cache
        self.waiting: list[Request] = []  # by arrival
        self.running: list[Request] = []  # by arrival
        self.in_transit: dict[str, Request] = {}  # PD decode side: pages given, the prompt's cache on its way
        self.num_retractions = 0
        self._hold_admission = False  # after a retraction: the pool is over-committed until one finishes
        self._prompts_turn = False  # mixed: the last step's decode rows filled the budget, no prompt ran

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.capacity * self.cfg.page_size

    @property
    def pages_to_admit(self) -> int:
        return pages_to_admit(self.cfg.page_size, self.cfg.spec_steps)

    def capacity_problem(self) -> str | None:
        """Why no request could ever start in this pool (the engine refuses to start with it), or None."""
        if self.allocator.capacity >= self.pages_to_admit:
            return None
        return (f"the KV pool holds {self.allocator.capacity} page(s) of {self.cfg.page_size} tokens and a request "
                f"needs {self.pages_to_admit} free to start: raise --max-total-tokens or --mem-fraction")

    def check_fits(self, prompt_len: int, max_new_tokens: int, cache_tokens: int | None = None) -> None:
        """Reject what can never run: the message names both numbers, max_tokens first (the server names the field
        the client sent from a message's first word, streaming.checked). `cache_tokens`: the new tokens this
        server's cache must hold (a PD prefill server holds only the first; default max_new_tokens)."""
        limit = self.cfg.context_length
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len >= limit:
            # (this model's maximum context length is: OpenAI's words, which clients such as litellm look for)
            raise RequestError(f"the prompt has {prompt_len} tokens but this model's maximum context length is "
                               f"{limit} tokens")
        if prompt_len + max_new_tokens > limit:
            raise RequestError(f"max_tokens ({max_new_tokens}) + the prompt ({prompt_len} tokens) = "
                               f"{prompt_len + max_new_tokens} tokens, but this model's maximum context length is "
                               f"{limit} tokens")
        held = max_new_tokens if cache_tokens is None else min(cache_tokens, max_new_tokens)
        if prompt_len + held + self.cfg.decode_lookahead - 1 > self.capacity_tokens:
            what = (f"max_tokens ({max_new_tokens}) + the prompt ({prompt_len} tokens)" if held == max_new_tokens
                    else f"the prompt ({prompt_len} tokens) + {held} new token(s)")
            raise RequestError(f"{what}{self.lookahead_note()} need more cache than the whole KV pool holds "
                               f"({self.capacity_tokens} tokens)")

    def lookahead_note(self) -> str:
        """What a refusal adds to the request's tokens: the slots speculative steps write past the last token."""
        slack = self.cfg.decode_lookahead - 1
        return f" + the {slack} slots MTP drafts write past them" if slack else ""

    def check_queue(self, held_elsewhere: int = 0) -> None:
        """QueueFull when the waiting requests (and `held_elsewhere`, about to join them) fill the queue."""
        if len(self.waiting) + held_elsewhere >= self.cfg.max_queued_requests:
            raise QueueFull(f"the queue is full ({self.cfg.max_queued_requests} requests waiting)")

    def add(self, req: Request, checked: bool = False) -> None:
        """`checked`: check_fits and check_queue passed when the request came (it waited elsewhere since). What can
        never run is refused as such before a full queue is (a 503 would tell the client to retry it)."""
        if not checked:
            self.check_fits(len(req.prompt_ids), req.max_new_tokens)
            self.check_queue()
        self._enqueue(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and return its pages (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.in_transit.pop(req.rid, None)
        freed = bool(req.pages)  # (a queued request holds none: its end makes no room for a retracted one)
        self._release(req)
        req.state = RequestState.FINISHED
        if freed:
            self._hold_admission = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- PD disaggregation: requests whose KV cache moves between servers ----------------------

    def preallocate(self, req: Request, tokens: int) -> bool:
        """Decode side: give a request pages for `tokens` (its prompt) that a prefill server will fill, leaving
        what the running requests' next decode step and its own first one need. False when they do not fit now, or
        when the running requests and those in transit reach --max-running-requests.
        Full pages of the prompt that this server's prefix cache holds are shared, not sent again:
        req.cached_tokens says how many tokens the transfer skips. Requests that wait here already (retracted,
        earlier arrivals) go first, and after a retraction nothing new starts until one frees pages: the rule of
        admission (_admission_held)."""
        if self._admission_held() or (self.waiting and self.waiting[0].arrival < req.arrival):
            return False
        cached = self.cache.match(req.prompt_ids, limit=tokens - 1, record_hits=False) if self.cache is not None else []
        need = self._pages_for(tokens) - len(cached)
        reserve = sum(self._pages_missing(r, r.num_cached + self.cfg.decode_lookahead)
                      for r in self.running if not self._prefilling(r))
        reserve += self._first_decode_pages(tokens, 0)  # held as admission holds it (else retracted on arrival)
        if self._free_pages(need + reserve) - reserve < need:  # evicts cached prefixes no request uses
            self.allocator.free(cached)
            return False
        if self.cache is not None:
            self.cache.count(tokens, len(cached))
        req.pages = cached + self.allocator.alloc(need)
        req.cached_tokens = len(cached) * self.cfg.page_size
        req.admitted = True  # (a retraction's re-admission keeps this cached_tokens, as in admission)
        req.state = RequestState.TRANSFERRING
        self.in_transit[req.rid] = req
        return True

    def resume(self, req: Request, num_cached: int) -> None:
        """Decode side: the request's KV cache arrived; it decodes from num_cached on."""
        req.num_cached = num_cached
        req.state = RequestState.RUNNING
        self.in_transit.pop(req.rid, None)
        bisect.insort(self.running, req, key=lambda r: r.arrival)

    def park(self, req: Request) -> None:
        """Prefill side: the request stops running but keeps its pages while they are sent."""
        self.running.remove(req)
        req.state = RequestState.TRANSFERRING

    def schedule(self) -> StepPlan | None:
        """The next step: decode rows of running requests and prefill chunks under one token budget
        (mixed chunk), or prefill first and decode when no chunk can run."""
        for _ in range(len(self.running) + 1):
            budget = self.cfg.chunked_prefill_size
            if self.cfg.mixed_chunk:
                decode, prefill = self._mixed_rows(budget)
            else:
                prefill = self._prefill_chunks(budget, after_decode=False)
                decode = [] if prefill else self._decode_rows()
            if decode is not None and (decode or prefill):
                return self._plan(decode, prefill)
            if not self.running or (decode is not None and any(r.inflight for r in self.running)):
                return None  # (overlap) tokens in flight end or feed their requests once committed: wait
            self._retract(self.running[-1])  # the decoders' next pages do not fit: the newest waits again
        return None

    def advance(self, plan: StepPlan, requests: dict[str, Request], rows_kept: list[int] | None = None) -> None:
        """The plan's requests now hold their first rows_kept[b] rows in the cache (all rows when None;
        a verify step keeps the accepted run). Dummy requests hold nothing."""
        for b, (rid, prefix, q) in enumerate(zip(plan.rids, plan.prefix_lens, plan.q_lens)):
            if rid != DUMMY_RID:
                requests[rid].num_cached = prefix + (q if rows_kept is None else rows_kept[b])

    # -- internals ---------------------------------------------------------------------------

    def _at_max_running(self) -> bool:
        return len(self.running) + len(self.in_transit) >= self.cfg.max_running_requests

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def _prefilling(self, req: Request) -> bool:
        """Still feeding known tokens (with speculation: until its prompt's last chunk made its drafts)."""
        return req.pending > 1 or req.num_cached == 0 or (self.cfg.spec_steps > 0 and not req.draft_ids)

    def _pages_missing(self, req: Request, tokens: int) -> int:
        return max(self._pages_for(tokens) - len(req.pages), 0)

    def _free_pages(self, wanted: int) -> int:
        """Free pages, evicting cached prefixes no request uses while fewer than `wanted` are free."""
        if self.cache is not None and self.allocator.num_free < wanted:
            self.cache.evict(wanted - self.allocator.num_free)
        return self.allocator.num_free

    def _reuse_prefix(self, req: Request) -> int | None:
        """An admitted request starts from the longest cached prefix of its tokens (at least its last
        token is computed, to sample from). Returns the pages it found, None when it did not look."""
        if self.cache is None or req.pages or req.params.prompt_logprobs is not None:
            return None
        req.pages = self.cache.match(req.token_slice(0, req.num_tokens), limit=req.num_tokens - 1, record_hits=False)
        req.num_cached = len(req.pages) * self.cfg.page_size
        if not req.admitted:  # (again after a retraction: the match covers its output too, not the prompt's hit)
            req.cached_tokens = req.num_cached
        return len(req.pages)

    def _release(self, req: Request) -> None:
        """The request's pages go back; its full pages stay in the prefix cache for later requests."""
        if self.cache is not None and req.num_cached:  # (with the token after them: MTP's entries depend on it)
            # A stop inside an accepted run leaves num_cached past its tokens (the run's later tokens are in the
            # cache, not in the request): only its own tokens are cached, the last one's next token unknown.
            written = min(req.num_cached, req.num_tokens)
            self.cache.insert(req.token_slice(0, written + 1), req.pages, written)
        self.allocator.free(req.pages)
        req.pages, req.num_cached = [], 0

    def _first_decode_pages(self, end: int, drafts: int) -> int:
        """Pages the first decode of a request whose prompt ends at `end` takes beyond those its prompt's last chunk
        (with `drafts` slots) takes: held when it is admitted, or given pages for a transfer. Not a whole
        lookahead's pages: with pages of many tokens the prompt's last page usually has the room, and a prefix the
        cache hands over could otherwise leave a pool that fits the request no room to admit it, forever."""
        return max(self._pages_for(end + self.cfg.decode_lookahead) - self._pages_for(end + drafts), 0)

    def _prefill_chunks(self, budget: int, after_decode: bool) -> list[tuple[Request, int]]:
        chosen: list[tuple[Request, int]] = []
        drafts = max(self.cfg.spec_steps - 1, 0)
        # A chunk leaves the pages the next decode step of each decoding request needs (already taken
        # when the decode rows run in this step) and, when admitting, one request's first decode, so a
        # prefill never takes pages a decode needs (no thrash).
        reserve = 0 if after_decode else sum(self._pages_missing(r, r.num_cached + self.cfg.decode_lookahead)
                                             for r in self.running if not self._prefilling(r))
        for req in [r for r in self.running if self._prefilling(r)] + list(self.waiting):
            if budget <= 0:
                break
            if req.inflight:  # retracted with a token in flight: it is fed again once that is committed
                continue
            admitting = req.state is RequestState.WAITING
            if admitting and self._admission_held():
                break
            hit = self._reuse_prefix(req) if admitting else None
            held = reserve + (self._first_decode_pages(req.num_cached + req.pending, drafts) if admitting else 0)
            want = held + self._pages_missing(req, req.num_cached + min(req.pending, budget) + drafts)
            free = self._free_pages(want)
            room = (len(req.pages) + max(free - held, 0)) * self.cfg.page_size - req.num_cached
            chunk = min(req.pending, budget, room, self.cfg.max_logit_rows if self._scores_prompt(req) else budget)
            if chunk == req.pending and room < chunk + drafts:
                chunk = min(req.pending - 1, room)  # the last chunk also needs its first drafts' slots
            if chunk <= 0:
                if admitting:
                    self._release(req)  # give back the reused prefix until it is admitted
                break
            new_pages = self._pages_missing(req, req.num_cached + chunk + (drafts if chunk == req.pending else 0))
            req.pages += self.allocator.alloc(new_pages)
            if admitting:
                if hit is not None:  # counted once admitted, not at each try (a re-admission's reuse counts too)
                    self.cache.count(req.num_tokens, hit)
                req.admitted = True
                self.waiting.remove(req)
                req.state = RequestState.RUNNING
                bisect.insort(self.running, req, key=lambda r: r.arrival)
            chosen.append((req, chunk))
            budget -= chunk
        return chosen

    def _mixed_rows(self, budget: int) -> tuple[list[tuple[Request, int]] | None, list[tuple[Request, int]]]:
        """Decode rows first, prompt chunks in the rest of the budget. When the decode rows fill it, every other
        step is the prompts' (a prefill step of the whole budget, as without mixed chunks): a prompt never
        waits for a decoder to finish."""
        decode = self._decode_rows()
        if decode is None:
            return None, []
        rest = budget - sum(q for _, q in decode)
        prefill = []
        if rest <= 0 and self._prompts_turn:  # (the decode rows' pages stay with them for their next step)
            prefill = self._prefill_chunks(budget, after_decode=False)
            decode = decode if not prefill else []
        elif rest > 0:
            prefill = self._prefill_chunks(rest, after_decode=True)
        self._prompts_turn = rest <= 0 and not prefill
        return decode, prefill

    def _decode_rows(self) -> list[tuple[Request, int]] | None:
        """Every decoding request's rows (its last token, and its drafts with speculation), with the pages
        its step writes; None when those pages do not fit."""
        ahead = self.cfg.decode_lookahead
        batch = [r for r in self.running  # (one whose in-flight token is its last takes no more rows)
                 if not self._prefilling(r) and not r.ends_with_inflight(self.cfg.context_length)]
        missing = [self._pages_missing(r, r.num_cached + ahead) for r in batch]
        need = sum(missing)
        if need > self._free_pages(need):
            return None
        for req, n in zip(batch, missing):
            if n:
                req.pages += self.allocator.alloc(n)
        return [(r, 1 + self.cfg.spec_steps) for r in batch]

    def _plan(self, decode: list[tuple[Request, int]], prefill: list[tuple[Request, int]]) -> StepPlan:
        spec = self.cfg.spec_steps
        input_ids: list[int] = []
        for req, q in decode:  # the last token (not cached yet), then the drafts of the last step
            assert len(req.draft_ids) == spec, f"request {req.rid} has {len(req.draft_ids)} drafts, not {spec}"
            last = [IN_FLIGHT] if req.inflight else req.token_slice(req.num_cached, req.num_cached + 1)
            input_ids += last + req.draft_ids
        for req, q in prefill:
            input_ids += req.token_slice(req.num_cached, req.num_cached + q)
        samples = [True] * len(decode) + [r.num_cached + q == r.num_tokens for r, q in prefill]
        logits = [q for _, q in decode] + [q if self._scores_prompt(r) else int(s)
                                           for (r, q), s in zip(prefill, samples[len(decode):])]
        mode = (StepMode.MIXED if prefill else StepMode.VERIFY if spec else StepMode.DECODE) if decode \
            else StepMode.EXTEND
        chosen = decode + prefill
        return StepPlan(
            mode=mode, rids=tuple(r.rid for r, _ in chosen), pages=tuple(r.page_ids() for r, _ in chosen),
            prefix_lens=tuple(r.num_cached for r, _ in chosen), q_lens=tuple(q for _, q in chosen),
            logit_counts=tuple(logits), samples=tuple(samples), input_ids=tuple(input_ids),
            num_drafts=(spec,) * len(decode) + (0,) * len(prefill))

    @staticmethod
    def _scores_prompt(req: Request) -> bool:
        """Prompt log-probabilities asked for and not all computed yet: every prefill row yields logits."""
        return req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids) - 1

    def _admission_held(self) -> bool:
        """No new request starts (admitted, or given pages for a transfer): at --max-running-requests, or after a
        retraction while requests run and none has freed pages since (the pool is over-committed)."""
        return self._at_max_running() or (self._hold_admission and bool(self.running))

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)  # its prefix stays cached: re-admission reuses what was not evicted meanwhile
        req.draft_ids = []
        self.num_retractions += 1
        self._hold_admission = True
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        req.state = RequestState.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)
