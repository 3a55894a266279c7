"""Start-up warm-up: a few prompts through the whole engine before it serves, so the first requests find
the prefill-shaped Triton kernels compiled (kernels specialize on row-count buckets and on whether
counts are multiples of 16; CUDA graphs cover only decode, verify and draft steps). The statistics and
the prefix cache are reset afterwards, so the served requests see a fresh engine."""
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
GPU_LENGTHS = (17, 32, 100, 128, 600, 1024, 4096)  # around the kernels' row buckets (16, 64, 512, ...)
CPU_LENGTHS = (17, 32)  # nothing compiles on CPU: the path runs, briefly
MAX_STEPS_PER_PROMPT = 10_000  # a bound, far above the chunks of the longest prompt


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
    vocab = engine.cfg.vocab_size
    for i, n in enumerate(lengths):
        if engine.par.cfg.is_leader:  # a first token of its own: no prompt reuses another's cached prefix
            engine.add_request(f"dsaserve-warm-up-{i}", [(7 + i + 13 * j) % vocab for j in range(n)], params)
        for _ in range(MAX_STEPS_PER_PROMPT):
            engine.step()
            if not engine.last_sync.any_work:
                break
    _reset(engine)
    compiles.warmed_up()
    if lengths and engine.par.cfg.rank == 0:
        log.info("warm-up: prompts of %s tokens in %.1f s (%d kernel compilations so far)", lengths,
                 time.perf_counter() - start, compiles.kernel_compiles())


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
