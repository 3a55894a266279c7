"""Engine: scheduler + model runner + sampler + stop rules. The offline LLM and the rank processes
both drive it with add_request / abort / step."""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
from dataclasses import dataclass

from dsaserve.cache.pages import PageAllocator
from dsaserve.engine.layout import StepMode, StepPlan
from dsaserve.engine.model_runner import ModelRunner
from dsaserve.engine.request import FinishReason, Request, RequestError, RequestOutput, SamplingParams
from dsaserve.engine.sampler import sample
from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.parallel.groups import CollectiveFailed, Parallel
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    num_retractions: int
    steps: int


@dataclass(frozen=True)
class StepSync:
    """What all ranks agreed on before a step: rows per DP group, whether anyone has work or stops,
    and the lowest wake-up epoch any DP leader has seen (server.worker: how idle leaders meet again)."""
    dp_sizes: list[int]
    any_work: bool
    any_stop: bool
    epoch: int = 0


class StepFailedOnSomeRanks(RuntimeError):
    """A step raised on some ranks only: their states differ, the deployment must stop."""


class Engine:
    """On a DP group leader (or a single device) the engine schedules and samples; on the other
    ranks of the group it runs the leader's plans. Every rank calls step() in lockstep."""

    def __init__(self, args: ServerArgs, progress: bool = True, par: Parallel | None = None):
        from dsaserve.tiny import default_model_path
        if args.checks:
            os.environ["DSASERVE_CHECKS"] = "1"  # read by BatchLayout and the op wrappers, in this rank
        if args.model_path is None:
            log.warning("no --model-path: serving the embedded tiny model with random weights")
        self.model_path = args.model_path or str(default_model_path())
        self.args, self.par = args, par or Parallel()
        self.runner = ModelRunner(args, self.model_path, progress=progress, par=self.par)
        self.cfg = self.runner.cfg
        self.tokenizer = Tokenizer(self.model_path)
        if self.par.cfg.rank == 0 and not getattr(self.tokenizer.hf, "chat_template", None):
            log.warning("the tokenizer has no chat template: /v1/chat/completions will answer 400; "
                        "use /v1/completions with your own prompt format")
        self.context_length = args.context_length or self.cfg.context_length
        self.allocator = PageAllocator(self.runner.num_pages)
        self.scheduler = Scheduler(SchedulerConfig(
            page_size=args.page_size, chunked_prefill_size=args.chunked_prefill_size,
            max_running_requests=args.max_running_requests, max_queued_requests=args.max_queued_requests,
            context_length=self.context_length), self.allocator)
        eos = set(self.cfg.eos_token_ids)
        if self.tokenizer.hf.eos_token_id is not None:
            eos.add(self.tokenizer.hf.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        # Seeds for requests that carry none: distinct per DP group (round-robin must not pair them).
        self._seeds = random.Random(f"{args.seed}/{self.par.cfg.dp_rank}")
        self._finished_outside_step: list[RequestOutput] = []
        self.steps = 0
        self.last_sync = StepSync([0], False, False)
        # 0, or 1 + the collectives this rank entered in its last step before it raised: told to every
        # rank in the next exchange; the ranks go on only if every one failed at the same point.
        self._failed_at = 0
        self.par.exchange([1])  # every rank built its engine: start-up failures surface before "ready"

    # -- requests --------------------------------------------------------------------------

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; bad input raises RequestError naming the problem (nothing is queued)."""
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        params.validate()
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        room = min(self.context_length, self.scheduler.capacity_tokens) - len(prompt_ids)
        max_new = params.max_tokens if params.max_tokens is not None else room
        req = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, max_new_tokens=max_new,
                      arrival=next(self._arrivals),
                      seed=params.seed if params.seed is not None else self._seeds.getrandbits(63))
        self.scheduler.add(req)
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

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished_outside_step)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.allocator.num_free,
                           self.allocator.capacity, self.scheduler.num_retractions, self.steps)

    # -- the step --------------------------------------------------------------------------

    def sync(self, plan: StepPlan | None, keep_alive: bool = False, stop: bool = False,
             epoch: int = 0) -> tuple[StepPlan | None, StepSync]:
        """Leader's plan to its group; (rows, has work, stop, where the last step failed, epoch) of every
        rank to every rank. Raises StepFailedOnSomeRanks, on every rank, unless the last step failed on
        no rank or on every rank at the same point."""
        plan = self.par.broadcast_from_leader(plan)
        mine = [plan.num_tokens if plan else 0, int(keep_alive or self.scheduler.has_work()), int(stop),
                self._failed_at, epoch]
        rows = self.par.exchange(mine)
        failed_at = [r[3] for r in rows]
        if len(set(failed_at)) > 1:
            failed = [rank for rank, at in enumerate(failed_at) if at]
            how = "only" if 0 in failed_at else f"after different collectives {[at - 1 for at in failed_at]}"
            raise StepFailedOnSomeRanks(f"step {self.steps} failed on rank(s) {failed} {how}; the ranks no longer "
                                        f"agree, so every rank stops (see the failing rank's log)")
        self._failed_at = 0
        leaders = rows[::self.par.cfg.attn_tp]
        return plan, StepSync([r[0] for r in leaders], any(r[1] for r in rows), any(r[2] for r in rows),
                              min(r[4] for r in leaders))

    def step(self, keep_alive: bool = False, stop: bool = False, epoch: int = 0) -> list[RequestOutput]:
        """One step of the whole deployment. `keep_alive`: the caller has requests still to add
        (keeps the other ranks stepping); `stop`: ask every rank to leave its loop; `epoch`: the
        caller's wake-up counter (server.worker)."""
        outputs = self.take_finished()
        plan = self.scheduler.schedule() if self.par.cfg.is_leader else None
        plan, self.last_sync = self.sync(plan, keep_alive, stop, epoch)
        if sum(self.last_sync.dp_sizes) == 0:
            return outputs
        plan = plan or StepPlan.idle()  # an idle DP group: zero rows, the same collectives
        issued = self.par.issued
        try:
            return outputs + self._run(plan)
        except CollectiveFailed:
            raise  # the groups' state is unknown: this rank must go (the supervisor names it)
        except Exception as exc:  # a failed batch ends its requests with an error; the engine goes on
            log.exception("step failed")  # if it failed on every rank alike (the next exchange tells)
            self._failed_at = 1 + self.par.issued - issued
            for req in [self.requests[rid] for rid in plan.rids if rid in self.requests]:
                self._finish(req, FinishReason("error", message=f"the batch failed: {exc}"))
                outputs.append(self._output(req, [], []))
            return outputs

    def _run(self, plan: StepPlan) -> list[RequestOutput]:
        logits = self.runner.forward(plan, self.runner.layout(plan), self.last_sync.dp_sizes)
        self.steps += 1
        if not self.par.cfg.is_leader or plan.mode is StepMode.IDLE:
            return []
        outputs = []
        self.scheduler.advance(plan, self.requests)
        samplers = [self.requests[rid] for rid, s in zip(plan.rids, plan.samples) if s]
        tokens, logprobs = sample(logits, samplers)
        for i, (req, token) in enumerate(zip(samplers, tokens)):
            req.output_ids.append(token)
            lp = [logprobs[i]] if logprobs is not None and req.params.logprobs is not None else []
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, [token], lp))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return FinishReason("stop", matched=token)
        if p.stop:
            window = max(len(s) for s in p.stop) + 8  # tokens: each decodes to >= 1 char or a byte piece
            tail = self.tokenizer.decode(req.output_ids[-window:])
            matched = [s for s in p.stop if s in tail]
            if matched:
                text = self.tokenizer.decode(req.output_ids)
                first = min(matched, key=lambda s: (text.find(s) if s in text else len(text)))
                req.stop_text = text[:text.find(first)] if first in text else text
                return FinishReason("stop", matched=first)
        if len(req.output_ids) >= req.max_new_tokens or req.num_tokens >= self.context_length:
            return FinishReason("length")
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.finish = reason
        self.scheduler.remove(req)
        del self.requests[req.rid]

    def _output(self, req: Request, new_ids: list[int], new_lps: list) -> RequestOutput:
        return RequestOutput(rid=req.rid, new_token_ids=new_ids, new_logprobs=new_lps,
                             prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                             finish=req.finish, stop_text=req.stop_text)

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        start = time.monotonic()
        for _ in range(max_steps):
            if not self.has_work():
                break
            outputs += self.step()
        log.debug("ran %d steps in %.2fs", self.steps, time.monotonic() - start)
        return outputs
