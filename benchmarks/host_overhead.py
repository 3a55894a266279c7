"""Host time of a decode step outside the model forward: Engine.step minus ModelRunner.target (scheduling,
the layout build, sampling, committing tokens), measured without overlapped scheduling (timing the
forward synchronizes); then the step time of the same engine settings with overlap on (nothing timed
inside the step), so the table shows what overlap hides. The embedded model on the given device,
static-layout (CUDA-graph) path on, decode steps only, greedy unless --temperature (then --top-p, --top-k):

    python benchmarks/host_overhead.py --batch 1 16 64 [--input-len 20] [--device cpu] [--model-path DIR]
        [--temperature 0.6 --top-p 0.95] [--output-json host.json]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

from dsaserve import LLM, SamplingParams
from dsaserve.model.checkpoint import default_model_path


def start_decoding(llm: LLM, tag: str, batch: int, steps: int, input_len: int, sampling: dict[str, float]) -> None:
    """`batch` requests of `input_len` prompt tokens, prefilled, then a few decode steps (shapes warm);
    sampling: SamplingParams fields (greedy without)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 20, ignore_eos=True, **{"temperature": 0.0, **sampling})
    for i in range(batch):
        engine.add_request(f"{tag}-{batch}-{i}", [5 + (i * 7 + j) % 500 for j in range(input_len)], params)
    while any(not r.output_ids for r in engine.requests.values()):  # prefill (every request decodes after)
        engine.step()
    for _ in range(5):
        engine.step()


def step_ms(llm: LLM, batch: int, steps: int, input_len: int, sampling: dict[str, float]) -> float:
    """Decode ms per step, untimed inside (overlap stays overlapped)."""
    engine = llm.engine
    start_decoding(llm, "step", batch, steps, input_len, sampling)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    engine.run_until_idle()
    return 1e3 * elapsed / steps


def measure(llm: LLM, batch: int, steps: int, input_len: int, sampling: dict[str, float],
            profile: bool = False) -> dict[str, float]:
    engine, runner = llm.engine, llm.engine.runner
    forward = [0.0]
    target = runner.target

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = target(*args, **kwargs)
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        forward[0] += time.perf_counter() - start
        return out

    runner.target = timed
    try:
        start_decoding(llm, "host", batch, steps, input_len, sampling)
        forward[0], n, start = 0.0, 0, time.perf_counter()
        while engine.has_work() and n < steps:
            engine.step()
            n += 1
        total, inside = (time.perf_counter() - start) / n, forward[0] / n
        if profile:  # where the host time goes, by Python function (cumulative, 10 steps)
            prof = cProfile.Profile()
            prof.runcall(lambda: [engine.step() for _ in range(10)])
            print(f"batch {batch}, 10 steps:")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        while engine.has_work():
            engine.step()
    finally:
        runner.target = target
    return dict(batch=batch, step_ms=1e3 * total, forward_ms=1e3 * inside, host_ms=1e3 * (total - inside))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--input-len", type=int, default=20, help="prompt tokens (the context the steps decode at)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model-path", default=None, help="default: the embedded model (e.g. benchmarks/engine.py's "
                                                      "V3.2-width checkpoint instead)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of 10 steps")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    tokens = max(args.batch) * (args.input_len + args.steps + 100) + 4096
    common = dict(device=args.device, page_size=64, max_total_tokens=tokens,
                  cuda_graph_max_bs=max(args.batch))
    path = args.model_path or str(default_model_path())
    llm = LLM(path, disable_overlap_schedule=True, **common)
    rows = [measure(llm, b, args.steps, args.input_len, sampling, args.profile) for b in args.batch]
    del llm
    overlapped = LLM(path, **common)
    for r in rows:
        r["overlap_step_ms"] = step_ms(overlapped, r["batch"], args.steps, args.input_len, sampling)
    print(f"\n{overlapped.engine.runner.device}, threads {torch.get_num_threads()}, sampling {sampling}")
    print(f"{'batch':>5} {'step ms':>8} {'forward ms':>11} {'host ms':>8} {'host share':>11} {'overlap step ms':>16}")
    for r in rows:
        print(f"{r['batch']:>5} {r['step_ms']:>8.2f} {r['forward_ms']:>11.2f} {r['host_ms']:>8.2f} "
              f"{r['host_ms'] / r['step_ms']:>10.0%} {r['overlap_step_ms']:>16.2f}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
