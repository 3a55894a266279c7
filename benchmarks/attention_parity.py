"""How accurate each attention backend is: greedy tokens and chosen-token log-probs of the bf16 engine under
each backend against the fp32 torch run over the same cache format (the truth), bf16 and FP8 caches.

    python benchmarks/attention_parity.py --model-path /tmp/m3 [--backends triton flashmla] \
        [--kv-cache-dtype fp8_e4m3 bf16]

Prompts of 100-5000 tokens (top-k selection active), 12 greedy tokens each. For each backend: the mean and max
|chosen log-prob - truth's| before it leaves the truth's tokens, the step where it leaves them per prompt and
the truth's top-2 gap there (a near-tie flipped by rounding is a gap of a few hundredths of a nat). The first
backend runs twice (run-to-run determinism). How docs/benchmarks.md decided that `auto` may take FlashMLA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_triton_engine import Run, _first_diff, _greedy, _lp_errors  # noqa: E402

LENGTHS = (3000, 2500, 700, 4100, 100, 3300, 2049, 5000)


def report(kv: str, name: str, run: Run, truth: Run) -> None:
    errors = _lp_errors(run, truth)
    parts, gaps = [], []
    for (tokens, _), (t_tokens, t_lps) in zip(run, truth):
        step = _first_diff(tokens, t_tokens)
        parts.append(step)
        if step < len(t_tokens):
            top = sorted((lp for _, lp in t_lps[step][1]), reverse=True)
            gaps.append(round(top[0] - top[1], 4))
    print(f"{kv:9s} {name:15s} chosen log-prob error vs fp32: mean {sum(errors) / max(len(errors), 1):.4f} max "
          f"{max(errors, default=0):.4f}; leaves the fp32 tokens at steps {parts}; fp32 top-2 gap there {gaps}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--backends", nargs="+", default=["triton", "flashmla"])
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["fp8_e4m3", "bf16"])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 32768, (n,), generator=gen).tolist() for n in LENGTHS]
    for kv in args.kv_cache_dtype:
        truth = _greedy(args.model_path, "torch", "float32", prompts, kv, moe_backend="torch")
        runs = {b: _greedy(args.model_path, b, "bfloat16", prompts, kv, moe_backend="triton") for b in args.backends}
        again = _greedy(args.model_path, args.backends[0], "bfloat16", prompts, kv, moe_backend="triton")
        same = sum(a[0] == b[0] for a, b in zip(runs[args.backends[0]], again))
        for name, run in runs.items():
            report(kv, name, run, truth)
        print(f"{kv:9s} {args.backends[0]} identical run to run for {same}/{len(prompts)} prompts")


if __name__ == "__main__":
    main()
