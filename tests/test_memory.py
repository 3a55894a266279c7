"""Memory pressure: a pool for about two requests still serves ten, by waiting and retraction."""
from __future__ import annotations

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams


def test_ten_requests_in_a_two_request_pool(tiny_ds: str) -> None:
    prompts = prompts_ids(10, [20, 5, 31, 12, 8, 25, 3, 17, 28, 10], seed=6)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    free_run = LLM(tiny_ds, page_size=4, max_total_tokens=8192).generate(prompts, params)
    tight = LLM(tiny_ds, page_size=4, max_total_tokens=2 * (31 + 24) + 8)
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in free_run]
    assert all(o.finish_reason.kind == "length" and len(o.token_ids) == 24 for o in outs)
    stats = tight.engine.stats()
    assert stats.num_retractions > 0, "the test pool was meant to force retraction"
    assert stats.free_pages == stats.total_pages


@pytest.mark.parametrize("steps", [0, 2])
def test_retraction_over_the_fp8_cache(steps: int, tiny_ds: str) -> None:
    """Retracted requests recompute their e4m3 rows (decode-written ones by a prefill), with MTP off and on:
    the tokens of a roomy FP8-cache pool."""
    prompts = prompts_ids(10, [20, 5, 31, 12, 8, 25, 3, 17, 28, 10], seed=6)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    flags = dict(page_size=4, kv_cache_dtype="fp8_e4m3")
    if steps:
        flags.update(speculative_algorithm="NEXTN", speculative_num_steps=steps)
    free_run = LLM(tiny_ds, max_total_tokens=8192, **flags).generate(prompts, params)
    tight = LLM(tiny_ds, max_total_tokens=2 * (31 + 24) + 16, **flags)
    assert [o.token_ids for o in tight.generate(prompts, params)] == [o.token_ids for o in free_run]
    stats = tight.engine.stats()
    assert stats.num_retractions > 0 and stats.free_pages == stats.total_pages


def test_page_size_one_pressure(tiny_ds: str) -> None:
    prompts = prompts_ids(6, [9, 14, 3, 22, 7, 11], seed=7)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free_run = LLM(tiny_ds, page_size=1, max_total_tokens=4096).generate(prompts, params)
    tight = LLM(tiny_ds, page_size=1, max_total_tokens=60)
    assert [o.token_ids for o in tight.generate(prompts, params)] == [o.token_ids for o in free_run]
    assert tight.engine.stats().num_retractions > 0


def test_retraction_does_not_thrash() -> None:
    """Scheduler alone: two requests that cannot both finish in a 40-token pool. A retracted request
    must not be re-admitted while the pool is still over-committed (that loops prefill/retract)."""
    from dsaserve.cache.pages import PageAllocator
    from dsaserve.engine.request import Request, SamplingParams
    from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(page_size=1, chunked_prefill_size=8, max_running_requests=16,
                                      max_queued_requests=100, context_length=1000), PageAllocator(41))
    reqs = {r.rid: r for r in (Request("a", [1] * 10, SamplingParams(), 25, 0, 0),
                               Request("b", [1] * 25, SamplingParams(), 5, 1, 0))}
    for r in reqs.values():
        sched.add(r)
    forwarded = 0
    for _ in range(1000):
        if not sched.has_work():
            break
        plan = sched.schedule()
        forwarded += plan.num_tokens
        sched.advance(plan, reqs)
        for rid, samples in zip(plan.rids, plan.samples):
            if samples:
                reqs[rid].output_ids.append(1)
                if len(reqs[rid].output_ids) == reqs[rid].max_new_tokens:
                    sched.remove(reqs[rid])
    assert not sched.has_work() and sched.allocator.num_free == sched.allocator.capacity
    assert sched.num_retractions <= 2 and forwarded <= 2 * (10 + 25 + 25 + 5), (sched.num_retractions, forwarded)


def test_aborting_queued_requests_does_not_readmit_a_retracted_one() -> None:
    """Scheduler alone: after a retraction nothing new starts until a request frees pages. Clients that give up
    on queued requests (which hold no pages) made room for nothing, yet each such abort let the retracted
    request in again, and the pool thrashed: prefill, retract, prefill."""
    from dsaserve.cache.pages import PageAllocator
    from dsaserve.engine.request import Request, SamplingParams
    from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(page_size=1, chunked_prefill_size=8, max_running_requests=16,
                                      max_queued_requests=100, context_length=1000), PageAllocator(41))
    reqs = {r.rid: r for r in [Request("a", [1] * 10, SamplingParams(), 25, 0, 0),
                               Request("b", [1] * 25, SamplingParams(), 5, 1, 0)]
            + [Request(f"c{i}", [1] * 3, SamplingParams(), 1, 2 + i, 0) for i in range(20)]}
    for r in reqs.values():
        sched.add(r)
    for step in range(1000):
        if not sched.has_work():
            break
        queued = [r for r in sched.waiting if not r.admitted]
        if queued and step % 2:  # a client gives up on a request still in the queue
            sched.remove(queued[-1])
            del reqs[queued[-1].rid]
        plan = sched.schedule()
        sched.advance(plan, reqs)
        for rid, samples in zip(plan.rids, plan.samples):
            if samples:
                reqs[rid].output_ids.append(1)
                if len(reqs[rid].output_ids) == reqs[rid].max_new_tokens:
                    sched.remove(reqs.pop(rid))
    assert not sched.has_work() and sched.allocator.num_free == sched.allocator.capacity
    assert sched.num_retractions == 1, sched.num_retractions


def test_a_transfer_is_held_after_a_retraction_as_admission_is() -> None:
    """PD decode side: after a retraction, while requests run and none has freed pages, no request starts, by
    admission or by pages given to a transfer. Preallocation was held only while a request waited, so once the
    retracted one left the queue (re-admitted, or aborted) transfers took pages that admission would not."""
    from dsaserve.cache.pages import PageAllocator
    from dsaserve.engine.request import Request, SamplingParams
    from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(page_size=1, chunked_prefill_size=64, max_running_requests=16,
                                      max_queued_requests=100, context_length=1000), PageAllocator(30))
    reqs = {r.rid: r for r in [Request("a", [1] * 10, SamplingParams(), 15, 0, 0),
                               Request("b", [1] * 10, SamplingParams(), 15, 1, 0)]}
    for r in reqs.values():
        sched.add(r)
    while not sched.num_retractions:
        plan = sched.schedule()
        sched.advance(plan, reqs)
        for rid, samples in zip(plan.rids, plan.samples):
            reqs[rid].output_ids += [1] if samples else []
    assert [r.rid for r in sched.waiting] == ["b"] and [r.rid for r in sched.running] == ["a"]
    sched.remove(sched.waiting[0])  # the client gives up on the retracted request (it holds no pages)
    assert sched.allocator.num_free > 4
    assert not sched.preallocate(Request("t", [2] * 2, SamplingParams(), 1, 2, 0), 2)
    sched.remove(sched.running[0])  # a request frees pages: transfers start again
    assert sched.preallocate(Request("t", [2] * 2, SamplingParams(), 1, 2, 0), 2)


def test_a_transfer_waits_for_its_first_decodes_pages_as_admission_does() -> None:
    """PD decode side under MTP (S = 3: a decode writes up to 6 slots past the last token): an 8-token prompt takes
    2 pages of 4 and its first decode 2 more. With 3 free pages preallocation took the 2 and the transferred
    request was retracted at its first decode (and prefilled again here); it now waits, as admission holds a
    request's first decode pages, and goes once a 4th page is free."""
    from dsaserve.cache.pages import PageAllocator
    from dsaserve.engine.request import Request, SamplingParams
    from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(page_size=4, chunked_prefill_size=64, max_running_requests=16,
                                      max_queued_requests=100, context_length=1000, spec_steps=3), PageAllocator(5))
    other = sched.allocator.alloc(1)  # held elsewhere (a prefix, a transfer): 3 of the 4 pages free
    req = Request("t", [2] * 8, SamplingParams(), 4, 0, 0)
    assert not sched.preallocate(req, 8) and req.pages == [] and sched.allocator.num_free == 3
    sched.allocator.free(other)
    assert sched.preallocate(req, 8) and len(req.pages) == 2


@pytest.mark.parametrize("steps,page_size,context", [(3, 4, 96), (0, 64, 100)])
def test_the_default_pool_holds_a_whole_context_per_running_request(tiny_ds: str, steps: int, page_size: int,
                                                                    context: int) -> None:
    """Without --max-total-tokens the pool is at most --max-running-requests whole contexts: in whole pages,
    with MTP's slots past the last token. One request that fills the context is served in full, max_tokens
    given or left to the context (it used to be refused, or cut short, by a pool of exactly one context)."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    llm = LLM(tiny_ds, page_size=page_size, max_running_requests=1, context_length=context, **spec)
    prompt = prompts_ids(1, [context - 56], seed=8)[0]
    for max_tokens in (56, None):
        out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
        assert len(out.token_ids) == 56 and out.finish_reason.kind == "length"
    stats = llm.engine.stats()
    assert stats.free_pages == stats.total_pages


def test_a_mem_fraction_below_the_weights_is_refused_on_cpu(tiny_ds: str) -> None:
    """--mem-fraction of the RAM free before loading below the weights' own bytes: refused at start, naming it,
    every time (on CPU the weights are counted: free RAM moves by megabytes with the rest of the machine, and the
    server came up or not by chance)."""
    from dsaserve.server_args import SettingError
    with pytest.raises(SettingError, match=r"the KV pool has room for less than one page of 4 tokens .* the weights "
                                           r"and the pool may take --mem-fraction 1e-06 of the"):
        LLM(tiny_ds, page_size=4, mem_fraction=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fraction", [0.3, 0.88])
def test_the_gpu_pool_is_mem_fraction_of_the_device_less_the_weights(fraction: float, tiny_ds: str) -> None:
    """On a GPU --mem-fraction is SGLang's: the weights and the KV pool take that share of the memory free before
    the weights load; the rest stays free for activations and graphs (the engine's own measure, within 1%)."""
    import gc

    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dsaserve.planner import weight_bytes
    torch.cuda.init()
    free_before = torch.cuda.mem_get_info()[0]
    llm = LLM(tiny_ds, device="cuda", mem_fraction=fraction, max_running_requests=100_000, cuda_graph_max_bs=0)
    runner = llm.engine.runner
    weights = sum(weight_bytes(runner.model).values())
    pool = (runner.num_pages - 1) * runner.page_size * runner.bytes_per_token
    want = fraction * free_before - weights
    print(f"free before {free_before / 2**30:.2f} GiB, weights {weights / 2**20:.1f} MiB, pool {pool / 2**30:.2f} GiB")
    assert abs(pool - want) <= 0.01 * free_before, (pool, want)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
