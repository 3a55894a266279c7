"""Where a decode step's time goes (`dsaserve bench one-batch --profile B`, `benchmarks/engine.py --profile`).

A batch of B requests is prefilled, then decode steps run under torch's profiler. On a GPU it prints the
kernels of 8 steps (launches and device time per step, widest first), the device's idle time between kernels
with the kernels around it, and one middle layer's kernels in launch order with the time each adds to the
step: its end minus the previous kernel's end. Programmatic dependent launch lets a kernel start before the
previous one ends, so a kernel's own duration overstates its cost and that difference is the measure that sums
to the step. On a CPU it prints the operators by their own time instead.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from dsaserve.engine.engine import Engine
from dsaserve.engine.request import SamplingParams

STEPS = 8


@dataclass(frozen=True)
class Span:
    """One kernel's run on the device (microseconds)."""
    start: float
    end: float
    name: str


def device_gaps(spans: list[Span]) -> tuple[float, float, list[tuple[tuple[str, str], tuple[float, int]]]]:
    """(busy, wall, gaps) of device intervals: the idle gaps summed by the pair of kernels around them, widest
    total first (where in a step the device waits for the host)."""
    spans = sorted(spans, key=lambda s: s.start)
    busy, end, last = 0.0, spans[0].start, spans[0].name
    gaps: dict[tuple[str, str], list[float]] = {}
    for s in spans:
        if s.start > end:
            total = gaps.setdefault((last, s.name), [0.0, 0])
            total[0] += s.start - end
            total[1] += 1
        busy += max(0.0, s.end - max(s.start, end))
        if s.end > end:
            end, last = s.end, s.name
    ranked = sorted(((k, (v[0], int(v[1]))) for k, v in gaps.items()), key=lambda kv: -kv[1][0])
    return busy, end - spans[0].start, ranked


def one_layer(step: list[Span], layers: int) -> list[tuple[Span, float]]:
    """The kernels of layer layers // 2 (0-based) of a step, in launch order, each with the time it adds: its end
    less the latest end before it (0 when an earlier kernel ends later). A layer runs from one launch of the
    first kernel that runs once per layer (`layers` times) to the next; [] when none does (a draft pass's
    layers run the same kernels) or the step has under two layers."""
    step = sorted(step, key=lambda s: s.start)
    counts = Counter(s.name for s in step)
    marker = next((s.name for s in step if counts[s.name] == layers), None)
    if marker is None or layers < 2:
        return []
    at = [i for i, s in enumerate(step) if s.name == marker]
    k = min(layers // 2, layers - 2)
    latest = max((s.end for s in step[:at[k]]), default=step[at[k]].start)
    out = []
    for s in step[at[k]:at[k + 1]]:
        out.append((s, max(0.0, s.end - latest)))
        latest = max(latest, s.end)
    return out


def _start_batch(engine: Engine, batch: int, input_len: int) -> list[str]:
    """`batch` requests, each with its first token (early ones decode while later prompts prefill: each may be
    up to decode_lead tokens ahead), and long enough to stay through the profiled steps."""
    from dsaserve.bench.one_batch import decode_lead
    gen = torch.Generator().manual_seed(0)
    lead = decode_lead(batch, input_len, engine.scheduler.cfg.chunked_prefill_size, engine.spec_steps)
    rids = [f"profile-{i}" for i in range(batch)]
    for rid in rids:
        engine.add_request(rid, torch.randint(10, engine.cfg.vocab_size, (input_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=(STEPS + 4) * (engine.spec_steps + 1) + lead, temperature=0.0,
                                          ignore_eos=True))
    started: set[str] = set()
    while len(started) < batch and engine.has_work():
        started.update(o.rid for o in engine.step() if o.new_token_ids)
    if len(started) < batch:
        raise RuntimeError(f"only {len(started)} of {batch} requests produced a token")
    return rids


def print_decode_profile(engine: Engine, batch: int, input_len: int) -> None:
    """Print where decode steps of `batch` requests of `input_len`-token prompts spend their time (module doc)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = engine.runner.device.type == "cuda"
    rids = _start_batch(engine, batch, input_len)

    def profiled(steps: int):
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
            if cuda:
                torch.cuda.synchronize()
        if sum(rid in engine.requests for rid in rids) < batch:
            raise RuntimeError(f"a request ended inside the profiled steps: not a batch of {batch}")
        return prof

    steps = profiled(STEPS)
    single = profiled(1) if cuda else None
    engine.run_until_idle()
    if single is None:
        print(f"\noperators of {STEPS} decode steps at batch {batch} (CPU, by their own time):")
        print(steps.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
        return
    _print_kernels(steps, STEPS, f"decode at batch {batch}")
    spans = [Span(e.time_range.start, e.time_range.end, e.name) for e in single.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    layers = engine.cfg.num_hidden_layers
    layer = one_layer(spans, layers)
    if not layer:
        print(f"\none step at batch {batch}: {len(spans)} kernels; no kernel runs once per layer ({layers} layers)")
        return
    print(f"\none step at batch {batch}: {len(spans)} kernels; layer {min(layers // 2, layers - 2)}'s in order, from "
          f"one launch of the first kernel that runs once per layer to the next ({sum(a for _, a in layer):.1f} us):")
    print(f"{'adds us':>8} {'runs us':>8}  kernel")
    for s, adds in layer:
        print(f"{adds:8.2f} {s.end - s.start:8.2f}  {s.name[:100]}")


def print_prefill_profile(engine: Engine, batch: int, input_len: int) -> None:
    """Print where the prefill of `batch` prompts of `input_len` tokens spends its time: every step until each
    request has its first token, its kernels widest first (`bench one-batch --profile-prefill B`)."""
    from torch.profiler import ProfilerActivity, profile
    engine.evict_prefix_cache()
    cuda = engine.runner.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        _start_batch(engine, batch, input_len)
        if cuda:
            torch.cuda.synchronize()
    engine.run_until_idle()
    if not cuda:
        print(f"\noperators of the prefill of {batch} x {input_len} tokens (CPU, by their own time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
        return
    _print_kernels(prof, 1, f"the prefill of {batch} x {input_len} tokens", "prefill")


def _print_kernels(prof, steps: int, what: str, unit: str = "step") -> None:
    """Kernels per `unit` (the profile holds `steps` of them), widest first, then the device's idle gaps by
    the kernels around them."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) / steps
    count = sum(e.count for e in kernels) / steps
    print(f"\ndevice kernels per {unit} of {what}: {count:.0f} launches, {total:.0f} us of kernel time "
          "(durations overlap under programmatic dependent launch)")
    print(f"{'us/' + unit:>10} {'share':>6} {'n/' + unit:>9} {'us each':>9}  kernel")
    for e in kernels[:40]:
        us = e.self_device_time_total / steps
        print(f"{us:10.1f} {100 * us / total:5.1f}% {e.count / steps:9.1f} {us * steps / e.count:9.2f}  {e.key[:90]}")
    spans = [Span(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    if spans:
        busy, wall, gaps = device_gaps(spans)
        print(f"device busy {busy / steps:.0f} us of {wall / steps:.0f} us per {unit}; idle between kernels, by "
              f"the kernels around it (us per {unit}, times per {unit}):")
        for (before, after), (us, n) in gaps[:8]:
            print(f"{us / steps:8.1f} {n / steps:6.1f}  after {before[:50]}  before {after[:50]}")


__all__ = ["Span", "device_gaps", "one_layer", "print_decode_profile", "print_prefill_profile"]
