"""Engine: scheduler + model runner + sampler + stop rules. The offline LLM and the rank processes
both drive it with add_request / abort / step."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import time
from typing import Callable

from torch import Tensor

from dsaserve.cache.pages import PageAllocator
from dsaserve.cache.prefix import PrefixCache, PrefixStats
from dsaserve.engine import compiles, lockstep
from dsaserve.engine.acceptance import InFlight, launch_accept
from dsaserve.engine.grammar_compile import GrammarCompiler
from dsaserve.engine.layout import StepMode, StepPlan
from dsaserve.engine.model_runner import ModelRunner, StepShape
from dsaserve.engine.overlap import Overlap, input_ids
from dsaserve.engine.page_sync import PageReceiver, PageSender
from dsaserve.engine.request import (DisaggRoute, FinishReason, Request, RequestError, RequestOutput,
                                     SamplingParams, append_until_stop, check_token_ids)
from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
from dsaserve.engine.stats import EngineStats
from dsaserve.engine.thinking import ThinkingProgress
from dsaserve.spec.drafter import MTPDrafter, draft_input, drafts_in_flight, settle_drafts
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.engine.warmup import warm_up
from dsaserve.generation_config import read_generation_config
from dsaserve.ops import invariant
from dsaserve.parallel.groups import CollectiveFailed, Parallel
from dsaserve.server_args import ServerArgs, SettingError

log = logging.getLogger(__name__)
_PROMPT_LOGITS_BYTES = 256 << 20  # fp32 logits of one chunk that scores its prompt (echo / prompt_logprobs)


class Engine:
    """On a DP group leader (or a single device) the engine schedules and samples; on the other
    ranks of the group it runs the leader's plans. Every rank calls step() in lockstep.

    With speculative decoding a step is: the target over the plan's rows (a prompt chunk, or each
    request's last token and its S drafts), the leader's sampling and acceptance on the device, then the MTP
    drafter (spec/drafter.py) over the same rows and S - 1 chained draft steps, launched before the host reads
    the step's tokens. Requests finish only after the whole step, so no page is freed while a sub-step of the
    step still writes it.
    """

    def __init__(self, args: ServerArgs, progress: bool = True, par: Parallel | None = None):
        from dsaserve.model.checkpoint import default_model_path
        if args.checks:
            os.environ["DSASERVE_CHECKS"] = "1"  # read by BatchLayout and the op wrappers, in this rank
        if args.model_path is None:
            log.warning("no --model-path: serving the embedded tiny model")
        self.model_path = args.model_path or str(default_model_path())
        self.args, self.par = args, par or Parallel()
        compiles.starting()  # counted from the start (EngineStats.kernel_compiles)
        # Before the weights (fails in seconds). Chats render on rank 0 only: other nodes need no --chat-template file.
        self.tokenizer = Tokenizer(self.model_path, args.chat_template if self.par.cfg.rank == 0 else None)
        self.runner = ModelRunner(args, self.model_path, progress=progress, par=self.par)
        self.cfg = self.runner.cfg
        if self.par.cfg.rank == 0 and not self.tokenizer.chat_format(args.tokenizer_mode).available:
            log.warning("the tokenizer has no chat template: /v1/chat/completions will answer 400; "
                        "use /v1/completions with your own prompt format")
        self.context_length = args.context_length or self.cfg.context_length
        self.spec_steps = args.spec_steps
        self.drafter = MTPDrafter(self.runner, self.spec_steps) if self.spec_steps else None
        # Tests and benchmarks: replace the MTP drafts of a request (e.g. with the known continuation).
        self.draft_override: Callable[[Request, list[int]], list[int]] | None = None
        self._drafts: InFlight | None = None  # the last step's drafts, on the device until the next launch
        self.allocator = PageAllocator(self.runner.num_pages)
        self.prefix_cache = None if args.disable_radix_cache else PrefixCache(
            self.allocator, args.page_size, mtp=self.spec_steps > 0)
        self.scheduler = Scheduler(SchedulerConfig(
            page_size=args.page_size, chunked_prefill_size=args.tokens_per_group,
            max_running_requests=args.running_per_group, max_queued_requests=args.max_queued_requests,
            context_length=self.context_length, spec_steps=self.spec_steps, mixed_chunk=args.enable_mixed_chunk,
            max_logit_rows=max(1, _PROMPT_LOGITS_BYTES // (4 * self.cfg.vocab_size))), self.allocator,
            self.prefix_cache)
        if (problem := self.scheduler.capacity_problem()) is not None:  # not a server that refuses every request
            raise SettingError(problem)
        if args.dp_groups > 1 and self.par.cfg.rank == 0:
            log.info("DP attention: each of the %d groups runs up to %d requests and %d tokens per step "
                     "(--max-running-requests and --chunked-prefill-size are totals over the groups, as in SGLang)",
                     args.dp_groups, args.running_per_group, args.tokens_per_group)
        eos = set(self.cfg.eos_token_ids) | set(read_generation_config(args.model_path).eos_token_ids)
        if self.tokenizer.hf.eos_token_id is not None:
            eos.add(self.tokenizer.hf.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(self.cfg.vocab_size)  # the leader's compiles, beside the step loop
        self._arrivals = itertools.count()
        # Seeds for requests that carry none: distinct per DP group (round-robin must not pair them).
        self._seeds = random.Random(f"{args.seed}/{self.par.cfg.dp_rank}")
        self._finished_outside_step: list[RequestOutput] = []
        self.steps = 0
        self._spec = [0, 0, 0]  # verify steps, drafts proposed, drafts accepted
        self.last_sync = StepShape((0,), (0,), None, StepMode.DECODE, 1)
        # 0, or 1 + the collectives this rank entered in its last step before it raised, and then 1 + the ones every
        # DP group joins that it had entered in all (the same count on every rank in step): told to every rank in
        # the next exchange (lockstep.sync); the ranks go on only if every one failed at the same point.
        self.failed_at = self.failed_shared = 0
        self.arrived_pages: list[int] = []  # PD decode leader: pages written here, not yet on the group's ranks
        self.page_sender, self.page_receiver = PageSender(), PageReceiver()  # a plan's pages to the group (lockstep)
        self.runner.capture_graphs(self.par.cfg.dp, progress=progress and self.par.cfg.rank == 0)
        # PD disaggregation (dsaserve/disagg): the leader's side of the KV transfer, None when serving whole requests
        self.disagg = None
        if args.disaggregation_mode != "null" and self.par.cfg.is_leader:
            from dsaserve.disagg.sides import create_side
            self.disagg = create_side(self)
        # A group leader without speculation or PD schedules and commits while the device runs a step.
        leads = self.par.cfg.is_leader and not self.spec_steps and args.disaggregation_mode == "null"
        self.overlap = Overlap(self) if leads and not args.disable_overlap_schedule else None
        self.par.exchange([1])  # every rank built its engine: start-up failures surface before "ready"
        if not args.skip_server_warmup:
            warm_up(self)

    # -- requests --------------------------------------------------------------------------

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                    route: DisaggRoute | None = None) -> None:
        """Queue a request; bad input raises RequestError naming the problem (nothing is queued). With a
        PD `route` a prefill server hands the request over after its first token, and a decode server
        waits for its KV cache instead of prefilling it."""
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        params.validate()
        check_token_ids(prompt_ids, params, self.cfg.vocab_size)
        room = min(self.context_length, self.scheduler.capacity_tokens - self.scheduler.cfg.decode_lookahead + 1)
        max_new = params.max_tokens
        if max_new is None:  # as many as fit: the context, or the pool when it is smaller
            if 0 < len(prompt_ids) < self.context_length and len(prompt_ids) >= room:
                ahead = self.scheduler.lookahead_note()
                raise RequestError(f"the prompt ({len(prompt_ids)} tokens) + one new token{ahead} need more cache "
                                   f"than the whole KV pool holds ({self.scheduler.capacity_tokens} tokens)")
            max_new = room - len(prompt_ids)
        req = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, max_new_tokens=max_new,
                      arrival=next(self._arrivals),
                      seed=params.seed if params.seed is not None else self._seeds.getrandbits(63),
                      disagg=route if self.disagg is not None else None)
        if params.thinking_budget is not None:
            req.thinking = ThinkingProgress(self.tokenizer.token_bytes)
        if params.min_tokens:
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
            req.min_tokens_banned = tuple(sorted(t for t in ends if 0 <= t < self.cfg.vocab_size))
        if params.grammar is not None:  # first: where it queues below, its compile runs (DP leaders only: they sample)
            self.grammars.start(req)
        try:
            if req.disagg is not None:
                self.disagg.add(req)  # (its side keeps it from sampling until its grammar compiled)
            else:  # a request with a grammar joins the scheduler once that compiled (admit_compiled)
                self.scheduler.check_fits(len(req.prompt_ids), req.max_new_tokens)  # (before the queue, as add's)
                self.scheduler.check_queue(len(self.grammars.held))
                if params.grammar is not None:
                    self.grammars.hold(req)
                else:
                    self.scheduler.add(req, checked=True)
        except BaseException:
            self.grammars.discard(req)  # refused: its compile is not wanted
            raise
        self.requests[rid] = req

    def abort(self, rid: str, message: str = "aborted by the client") -> bool:
        req = self.requests.get(rid)
        if req is None:
            return False
        self._finish(req, FinishReason("abort", message=message))
        self._finished_outside_step.append(self._output(req, [], []))
        return True

    def take_finished(self) -> list[RequestOutput]:
        """Final outputs of requests that ended outside a step (aborts), without stepping."""
        outputs, self._finished_outside_step = self._finished_outside_step, []
        return outputs

    def evict_prefix_cache(self) -> None:
        """Drop every cached prefix that no request holds (after the warm-up; before a benchmark's uncached run)."""
        if self.prefix_cache is not None:
            self.prefix_cache.evict(self.allocator.capacity)

    def reset_counters(self) -> None:
        """Statistics from zero (after the start-up warm-up): steps, speculation, retractions, prefix hits."""
        self.steps, self._spec, self.scheduler.num_retractions = 0, [0, 0, 0], 0
        if self.prefix_cache is not None:
            self.prefix_cache.stats = PrefixStats()

    def has_work(self, compiling: bool = True) -> bool:
        """`compiling`: count requests that wait only for their grammar (a server waits on grammars.wake_fd)."""
        return (self.scheduler.has_work() or bool(self._finished_outside_step)
                or (self.overlap is not None and self.overlap.busy) or (compiling and bool(self.grammars.held)))

    def admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar compiled join the scheduler's queue (by arrival); a failed compile ends its own."""
        outputs = []
        for req, exc in self.grammars.ready():
            if exc is None:
                self.scheduler.add(req, checked=True)
            else:
                outputs.append(self.fail_request(req, f"the output constraint did not compile: {exc}"))
        return outputs

    def fail_request(self, req: Request, message: str) -> RequestOutput:
        """End a request with an error outside a step (a PD request's other server is told); its final output."""
        self._finish(req, FinishReason("error", message=message))
        return self._output(req, [], [])

    def poll_transfers(self) -> list[RequestOutput]:
        """PD (leader): advance this leader's KV transfers without a forward step; decode requests whose
        cache arrived join the running ones (their first token is in the outputs)."""
        return self.disagg.poll() if self.disagg is not None else []

    def activity(self) -> tuple[int, int, int, int]:
        """Cheap counters that change when stats() would report other requests or pages (a request that
        frees pages the prefix cache shares changes no free count, only the allocator's change counter)."""
        return (len(self.scheduler.running), self._waiting(), len(self.scheduler.in_transit), self.allocator.changes,
                self.scheduler.num_retractions)

    def _waiting(self) -> int:
        """Queued requests: the scheduler's, those whose grammar compiles and a PD side's (waiting for the other
        server before they hold pages)."""
        queued = len(self.scheduler.waiting) + len(self.grammars.held)
        return queued + (self.disagg.queued() if self.disagg is not None else 0)

    def _queued_tokens(self) -> int:
        """The tokens of the requests _waiting counts."""
        queued = sum(r.num_tokens for r in (*self.scheduler.waiting, *self.grammars.held))
        return queued + (self.disagg.queued_tokens() if self.disagg is not None else 0)

    def stats(self) -> EngineStats:
        cache = self.prefix_cache
        reclaimable = cache.reclaimable() if cache is not None else 0
        hits = (cache.num_pages, cache.stats.hit_tokens, cache.stats.queried_tokens) if cache is not None else (0, 0, 0)
        graphs = self.runner.graphs
        graph = (len(graphs.graphs), graphs.stats.captured, graphs.stats.eager_misses) if graphs else (0, 0, 0)
        return EngineStats(len(self.scheduler.running), self._waiting(),
                           self.allocator.num_free + reclaimable, self.allocator.capacity,
                           self.scheduler.num_retractions, self.steps, *self._spec, *hits, *graph,
                           compiles.kernel_compiles(), len(self.scheduler.in_transit),
                           self.scheduler.cfg.max_running_requests, self.scheduler.cfg.chunked_prefill_size,
                           self._queued_tokens())

    # -- the step --------------------------------------------------------------------------

    def step(self, keep_alive: bool = False, stop: bool = False, epoch: int = 0) -> list[RequestOutput]:
        """One step of the whole deployment. `keep_alive`: the caller has requests still to add
        (keeps the other ranks stepping); `stop`: ask every rank to leave its loop; `epoch`: the
        caller's wake-up counter (server.worker). Deterministic inference steps on one thread (ops/invariant.py)."""
        if not self.runner.ops.batch_invariant:
            return self._step(keep_alive, stop, epoch)
        with invariant.one_thread():
            return self._step(keep_alive, stop, epoch)

    def _step(self, keep_alive: bool, stop: bool, epoch: int) -> list[RequestOutput]:
        admitted = self.admit_compiled()
        if self.overlap is not None:
            return admitted + self.overlap.step(keep_alive, stop, epoch)
        outputs = admitted + self.take_finished()
        outputs += self.poll_transfers()  # decode requests whose KV cache arrived run in this step
        plan = self.scheduler.schedule() if self.par.cfg.is_leader else None
        plan, self.last_sync = lockstep.sync(self, plan, keep_alive, stop, epoch)
        if sum(self.last_sync.dp_sizes) == 0:
            self._drop_unread_drafts()
            return outputs
        plan = plan or StepPlan.idle()  # an idle DP group: zero rows (or dummies), the same collectives
        issued, shared = self.par.issued, self.par.shared
        try:
            return outputs + self._run(plan, self.last_sync)
        except Exception as exc:  # a failed batch ends its requests with an error; the engine goes on
            if not isinstance(exc, CollectiveFailed):  # (that one ends this rank: nothing to wait for)
                self._drop_unread_drafts()
            return outputs + self.fail_step(plan, exc, issued, shared)

    def fail_step(self, plan: StepPlan, exc: Exception, issued: int, shared: int | None = None,
                  local: bool = False) -> list[RequestOutput]:
        """End the plan's requests with the step's error (if it failed on every rank alike: the next
        exchange tells). `issued` / `shared`: the rank's collective counts when the step began (shared
        None: the failure came after the step's forward). A DP group that failed before any collective the
        other groups join stands in for its rows first (_stand_in), so that they lose nothing. `local`: the
        leader's own work after every rank's collectives of the step failed (sampling, committing, keeping the
        drafts, a prefill server's hand-over): the ranks still agree, so they are not told and go on."""
        if isinstance(exc, CollectiveFailed):
            raise exc  # the groups' state is unknown: this rank must go (the supervisor names it)
        log.exception("step failed", exc_info=exc)
        if not local:
            self.failed_at, self.failed_shared = 1 + self.par.issued - issued, 1 + self.par.shared
        if not local and self.par.cfg.dp > 1 and shared == self.par.shared:
            self._stand_in(self.last_sync)  # if this raises too, the rank goes (as above)
            self.failed_at = -self.failed_at
        outputs = []
        for rid in plan.rids:
            if rid in self.requests:  # (looked up as it goes, as ending one removes it)
                outputs.append(self.fail_request(self.requests[rid], f"the batch failed: {exc}"))
        return outputs

    def _stand_in(self, shape: StepShape) -> None:
        """This step's collectives on dummy rows, as many as the group announced: an idle group's dummies
        when the step replays a graph, else dummy requests (one per announced draft, StepPlan.stand_in)."""
        rows = shape.dp_sizes[self.par.cfg.dp_rank]
        plan = StepPlan.idle() if shape.graph_batch is not None or rows == 0 else StepPlan.stand_in(
            rows, shape.draft_sizes[self.par.cfg.dp_rank], self.runner.page_size, self.spec_steps)
        self._run(plan, shape, real=0)

    def _run(self, plan: StepPlan, shape: StepShape, real: int | None = None) -> list[RequestOutput]:
        """`real`: the plan's real requests (a stand-in's are all dummies); by default every one."""
        real = len(plan.rids) if real is None else real
        plan, layout = self.runner.prepare(plan, shape)
        ids = input_ids(plan, self.runner.device, self.par, self._drafts)  # verify rows gather drafts in flight
        hidden, logits = self.runner.target(ids, layout, shape.graph_batch is not None)
        issued = self.par.issued
        verdict, given, failure, local = None, None, None, False
        try:
            self._fill_drafts()
        except Exception as exc:  # noqa: BLE001 - the leader's read of the last step's drafts, which this step
            failure, local = exc, True  # verified: it fails here alone, and joins the draft steps below
        self.steps += 1
        leader = self.par.cfg.is_leader
        if leader and real and failure is None:
            try:  # on the device: the MTP pass below launches before the host reads a token
                verdict = launch_accept(self.requests, plan, real, logits)
                given = (draft_input(self.requests, plan, real, verdict, self.runner.device)
                         if self.drafter is not None else None)
            except Exception as exc:  # noqa: BLE001 - the leader's own work, after every rank's forward: local
                failure, local = exc, self.par.issued == issued
        drafts = None
        if self.drafter is not None:  # (after a failure: dummy input, so that the other ranks' draft steps run)
            if leader and given is None:
                given = draft_input(self.requests, plan, 0, None, self.runner.device)
            drafts = self.drafter.run(plan, layout, hidden, given, shape)
        if failure is not None:
            return self.fail_step(plan, failure, issued, local=local)
        if verdict is None:
            return []
        try:  # waits for the sampling, not for the draft steps queued after it
            accepted = verdict.read()
        except Exception as exc:  # noqa: BLE001 - after every rank's collectives of the step: local
            return self.fail_step(plan, exc, issued, local=True)
        outputs: list[RequestOutput] = []
        try:  # the leader's host work, after every rank's collectives of the step: a failure is local
            outputs = self._commit(plan, real, accepted)
            if drafts is not None:
                self._keep_drafts(plan, real, drafts)
            if self.disagg is not None:  # prefill side: requests with their first token (and drafts) go out
                self.disagg.after_step(accepted)
        except Exception as exc:  # noqa: BLE001 - (the outputs already committed still go out)
            return outputs + self.fail_step(plan, exc, issued, local=True)
        return outputs

    def _keep_drafts(self, plan: StepPlan, real: int, drafts: Tensor) -> None:
        """The drafts stay on the device until the next step has launched (its verify rows gather them there):
        the host schedules and lays out that step while the device drafts. Read at once where the host needs
        them after this step (a prefill server hands them over; tests and benchmarks override them)."""
        self._drafts = drafts_in_flight(self.requests, plan, real, drafts)
        if self.draft_override is not None or self.args.disaggregation_mode == "prefill":
            self._fill_drafts(self.draft_override)

    def _drop_unread_drafts(self) -> None:
        """The last step's drafts where no step verifies them (an idle or failed step): if they cannot be read,
        their requests only draft again."""
        try:
            self._fill_drafts()
        except Exception:  # noqa: BLE001 - settle_drafts dropped them
            log.exception("the last step's drafts could not be read; their requests draft again")

    def _fill_drafts(self, override: Callable[[Request, list[int]], list[int]] | None = None) -> None:
        """The last step's drafts into their requests (waits for the drafter, not for a step launched since)."""
        drafts, self._drafts = self._drafts, None
        if drafts is not None:
            settle_drafts(self.requests, drafts, override)

    def _commit(self, plan: StepPlan, real: int, accepted: dict[str, tuple]) -> list[RequestOutput]:
        """Cache lengths, tokens and stop rules after the whole step; finished requests free their pages."""
        kept = [len(accepted[r][0]) if d else q for r, q, d in zip(plan.rids[:real], plan.q_lens, plan.num_drafts)]
        self.scheduler.advance(plan, self.requests, kept)
        verifying = {r for r, d in zip(plan.rids[:real], plan.num_drafts) if d}
        outputs = []
        for rid, (tokens, lps) in accepted.items():
            req = self.requests[rid]
            if rid in verifying:
                req.spec_verify_ct += 1
                req.spec_accepted += len(tokens) - 1
                self._spec = [self._spec[0] + 1, self._spec[1] + self.spec_steps, self._spec[2] + len(tokens) - 1]
            outputs.append(self.commit_new_tokens(req, tokens, lps))
        return outputs

    def commit_new_tokens(self, req: Request, tokens: list[int], lps: list | None) -> RequestOutput:
        """Append tokens up to the first that stops the request (_append_tokens). If that raises (its stop rules
        or grammar), this request alone ends with the error: the step's others and the ranks go on."""
        delivered = len(req.output_ids)
        try:
            return self._append_tokens(req, tokens, lps)
        except Exception as exc:  # noqa: BLE001 - reported to the request's client
            log.exception("request %s: its new tokens could not be committed", req.rid)
            del req.output_ids[delivered:]  # the client gets none of them: its usage counts what it got
            if self.requests.get(req.rid) is req:
                self._finish(req, FinishReason("error", message=f"committing its tokens failed: {exc}"))
            return self._output(req, [], [])

    def _append_tokens(self, req: Request, tokens: list[int], lps: list | None) -> RequestOutput:
        """A prefill server's PD request never stops here: the decode server applies the stop rules to the token
        it hands over."""
        hands_over = req.disagg is not None and self.args.disaggregation_mode == "prefill"
        new, reason = append_until_stop(req, tokens, self.tokenizer, self.eos_ids, self.context_length,
                                        stops=not hands_over)
        if reason is not None:
            self._finish(req, reason)
        chosen = lps[:len(new)] if lps is not None and req.params.logprobs is not None else []
        out = self._output(req, new, chosen)
        if len(req.output_ids) == len(new) and req.params.prompt_logprobs is not None:  # its first tokens
            out = dataclasses.replace(out, prompt_logprobs=req.prompt_logprobs)
        return out

    def end_request(self, req: Request, reason: FinishReason) -> RequestOutput:
        """Finish a request outside a step (by the PD side, which has dealt with its room) and return its final
        output."""
        self._drop(req, reason)
        return self._output(req, [], [])

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """End a request: a PD request's other server learns why (pages a write may still reach wait for it)."""
        if req.disagg is not None and self.disagg is not None:
            self.disagg.release(req, reason)
        self._drop(req, reason)

    def _drop(self, req: Request, reason: FinishReason) -> None:
        req.finish = reason
        self.scheduler.remove(req)
        self.grammars.discard(req)
        del self.requests[req.rid]

    def _output(self, req: Request, new_ids: list[int], new_lps: list) -> RequestOutput:
        return RequestOutput(rid=req.rid, new_token_ids=new_ids, new_logprobs=new_lps,
                             prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                             finish=req.finish, stop_text=req.stop_text, spec_verify_ct=req.spec_verify_ct,
                             cached_tokens=req.cached_tokens)

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        start = time.monotonic()
        for _ in range(max_steps):
            if not self.has_work():
                break
            if not self.has_work(compiling=False):
                self.grammars.wait()
            outputs += self.step()
        log.debug("ran %d steps in %.2fs", self.steps, time.monotonic() - start)
        return outputs
