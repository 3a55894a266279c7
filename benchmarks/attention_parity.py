"""Greedy tokens of one model under two attention backends, and how close each divergence was.

    python benchmarks/attention_parity.py --model-path /tmp/m3 [--backends triton flashmla] \
        [--kv-cache-dtype bf16 fp8_e4m3]

Runs the first backend twice (run-to-run determinism) and the second once, on the same prompts (100-5000
tokens, so that top-k selection is active), 24 greedy tokens each. For every prompt where the two backends
part, prints the step and both backends' top two tokens with their log-probs: a gap of a bf16 step or two
at the divergence is a near-tie flipped by rounding, a wide gap is a difference to explain.
"""
from __future__ import annotations

import argparse
import gc

import torch

from dsaserve import LLM, SamplingParams

LENGTHS = (3000, 2500, 700, 4100, 100, 3300, 2049, 5000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--backends", nargs=2, default=["triton", "flashmla"])
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["bf16", "fp8_e4m3"])
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 32768, (n,), generator=gen).tolist() for n in LENGTHS]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    base, other = args.backends
    for kv in args.kv_cache_dtype:
        runs = []
        for backend in (base, base, other):
            llm = LLM(args.model_path, attention_backend=backend, kv_cache_dtype=kv, max_total_tokens=60000,
                      max_running_requests=len(prompts))
            runs.append(llm.generate(prompts, params))
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        first, again, theirs = runs
        same = sum(a.token_ids == b.token_ids for a, b in zip(first, again))
        print(f"{kv}: {base} identical run to run for {same}/{len(prompts)} prompts")
        for i, (a, b) in enumerate(zip(first, theirs)):
            step = next((j for j, (u, v) in enumerate(zip(a.token_ids, b.token_ids)) if u != v), None)
            if step is None:
                print(f"  prompt {i} ({LENGTHS[i]} tokens): identical")
                continue
            top_a, top_b = a.logprobs[step][1], b.logprobs[step][1]
            gap = top_a[0][1] - top_a[1][1]
            print(f"  prompt {i} ({LENGTHS[i]} tokens): differs at token {step}; {base} top-2 {top_a} (gap {gap:.4f}), "
                  f"{other} top-2 {top_b}")


if __name__ == "__main__":
    main()
