"""Start-up warm-up: a few prompts through the whole engine before it serves, so the first requests find
the prefill-shaped Triton kernels compiled (kernels specialize on row-count buckets and on whether
counts are multiples of 16; CUDA graphs cover only decode, verify and draft steps). Without graphs on a
GPU the decode-shaped variants are warmed too: requests that end one decode step apart take the batch
through every size from DECODE_BATCHES down to 1. On a GPU every FP8 GEMM runs once in each of its row tiers, also
with its rows handed over quantized (quant.warm_up_gemms): eager decode-sized steps of any size (MTP draft steps
beside prompt chunks) reach tiles no prompt does. The statistics and the prefix cache are reset afterwards, so
the served requests see a fresh engine."""
from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING

from dsaserve.engine import compiles
from dsaserve.engine.request import SamplingParams

if TYPE_CHECKING:
    from dsaserve.engine.engine import Engine

log = logging.getLogger(__name__)
# A prompt in every row tier of the FP8 GEMM (ops/fp8.gemm_tier: 1, 8, 17, 48, 80, 100, 600) and around the other
# kernels' row buckets (16, 64, 512, ...): eager steps of any size (mixed steps, decode batches past the graph
# sizes) find their tiles compiled. 65-95 rows had no prompt (graphs stop at 64, cuBLAS takes 96+ where it applies).
GPU_LENGTHS = (1, 8, 17, 32, 48, 80, 100, 128, 600, 1024, 4096)
CPU_LENGTHS = (17, 32)  # nothing compiles on CPU: the path runs, briefly
MAX_STEPS_PER_PROMPT = 10_000  # a bound, far above the chunks of the longest prompt
DECODE_BATCHES = 64  # without graphs: decode batches of 64 down to 1 row (the default graph buckets' range)
DECODE_PROMPT = 17


def warmup_lengths(on_gpu: bool, chunk: int, longest: int) -> list[int]:
    """Prompt lengths to warm up with: each row bucket once and, on a GPU, the chunk size (the largest
    prefill step); none over the chunk size or longer than a request may be (`longest`)."""
    candidates = GPU_LENGTHS + (chunk,) if on_gpu else CPU_LENGTHS
    return sorted({min(n, chunk) for n in candidates if min(n, chunk) <= longest})


def warm_up(engine: Engine) -> None:
    """Every rank calls this after start-up; DP group leaders add the prompts, every rank steps."""
    sched = engine.scheduler
    longest = min(engine.context_length, sched.capacity_tokens - sched.cfg.decode_lookahead) - 1
    lengths = warmup_lengths(engine.runner.device.type == "cuda", sched.cfg.chunked_prefill_size, longest)
    start = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, seed=0)
    # the first prompt samples (top-p): the sampling kernel compiles here, not at the first sampled request
    sampled = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, ignore_eos=True, seed=0)
    for i, n in enumerate(lengths):
        _run(engine, [(f"dsaserve-warm-up-{i}", _prompt(engine, i, n), sampled if i == 0 else params)])
    gemms = 0
    if engine.runner.device.type == "cuda":  # each FP8 GEMM tier, also with rows handed over quantized
        from dsaserve.model import quant  # (torch: the server's main process imports this module without it)
        from dsaserve.ops.fp8 import GEMM_TIER_TOPS
        gemms = quant.warm_up_gemms(engine.runner.model, GEMM_TIER_TOPS, engine.runner.dtype)
    batches, lead = _decode_batches(engine, longest)
    if batches:  # request b ends one decode step after request b - 1, once all of them decode
        _run(engine, [(f"dsaserve-warm-up-decode-{b}", _prompt(engine, len(lengths) + b, DECODE_PROMPT),
                       SamplingParams(max_tokens=lead + b, temperature=0.0, ignore_eos=True, seed=0))
                      for b in range(batches)])
    _reset(engine)
    compiles.warmed_up()
    if lengths and engine.par.cfg.rank == 0:
        decode = f", decode batches of {batches} down to 1" if batches > 0 else ""
        tiers = f", {gemms} FP8 GEMMs over their row tiers" if gemms else ""
        log.info("warm-up: prompts of %s tokens%s%s in %.1f s (%d kernel compilations so far)", lengths, decode, tiers,
                 time.perf_counter() - start, compiles.kernel_compiles())


def _prompt(engine: Engine, i: int, n: int) -> list[int]:
    """A first token of its own: no warm-up prompt reuses another's cached prefix."""
    return [(7 + i + 13 * j) % engine.cfg.vocab_size for j in range(n)]


def _decode_batches(engine: Engine, longest: int) -> tuple[int, int]:
    """(requests, lead) that warm the decode shapes: none with CUDA graphs (their capture ran every bucket) or
    off a GPU; else up to DECODE_BATCHES, as many as run, queue and fit the pool and the context together.
    Each takes `lead` tokens more than the prefill steps of all of them (chunks shared with decode rows) could
    give it, so the batch starts whole and loses one request per step. Verify steps that accept several
    tokens may end several at once (skipping sizes). Contexts stay short: the selection's key widths are
    warmed by dummy steps at start-up (ModelRunner.capture_graphs)."""
    runner, cfg = engine.runner, engine.scheduler.cfg
    if runner.graphs is not None or runner.device.type != "cuda":
        return 0, 0
    batches = min(DECODE_BATCHES, cfg.max_running_requests, cfg.max_queued_requests)
    lead = -(-batches * DECODE_PROMPT // max(cfg.chunked_prefill_size - batches, 1)) + 2
    per_request = DECODE_PROMPT + lead + batches + cfg.decode_lookahead + cfg.page_size
    batches = min(batches, engine.scheduler.capacity_tokens // per_request, longest - DECODE_PROMPT - lead)
    return max(batches, 0), lead


def _run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> None:
    """DP group leaders add the requests; every rank steps until no group has work."""
    if engine.par.cfg.is_leader:
        for rid, ids, params in requests:
            engine.add_request(rid, ids, params)
    for _ in range(MAX_STEPS_PER_PROMPT):
        engine.step()
        if not engine.last_sync.any_work:
            break


def _reset(engine: Engine) -> None:
    engine.take_finished()
    engine.evict_prefix_cache()  # the warm-up prompts are nobody's prefix
    engine.reset_counters()


def freeze_startup_heap() -> None:
    """For a process that serves for its lifetime, once start-up is done: collect, then move every object
    alive now (modules, model, tokenizer, graphs: some 250K) out of the collector's generations. A full
    collection walks every tracked object; over the start-up heap that was a 125-150 ms pause on a 2-core
    CPU box, taken inside whatever step allocates the object that triggers it."""
    gc.collect()
    gc.freeze()
