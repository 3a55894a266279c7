"""Time of `sample_tokens` for temperature-sampled rows over a 129,280-token vocabulary (DeepSeek-V3.2's), on
CUDA: temperature only, + top_p 0.95, + top_k 50; torch.sort of the same rows for scale; the floor is one
read of the logits at the copy bandwidth measured in the same run. CUDA events around each call (host
launch gaps included, as a decode step sees them), median of 20 after 5. Two kinds of rows: `flat`
(N(0, 3) logits: at temperature 0.6 thousands of tokens share the mass) and `sharp` (N(0, 2) with 32 tokens
raised by 12, as a trained model's rows put most of the mass on a few). Prints a table, writes JSON.

    python benchmarks/sampling.py [--rows 1 16 64] [--logits flat sharp] [--output-json sampling.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsaserve.bench.one_batch import copy_bandwidth, median_seconds
from dsaserve.engine.request import Request, SamplingParams
from dsaserve.engine.sampler import sample_tokens

VOCAB = 129280


def make_logits(rows: int, shape: str, dev: torch.device) -> torch.Tensor:
    gen = torch.Generator(dev).manual_seed(rows)
    if shape == "flat":
        return torch.randn(rows, VOCAB, device=dev, generator=gen) * 3
    logits = torch.randn(rows, VOCAB, device=dev, generator=gen) * 2
    head = torch.randint(0, VOCAB, (rows, 32), device=dev, generator=gen)
    return logits.scatter_add_(1, head, torch.full(head.shape, 12.0, device=dev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--logits", nargs="+", choices=["flat", "sharp"], default=["flat", "sharp"])
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bandwidth = copy_bandwidth(dev)
    cases = {"temperature 0.6": {}, "+ top_p 0.95": {"top_p": 0.95}, "+ top_k 50": {"top_k": 50}}
    results = []
    for rows, shape in [(r, s) for r in args.rows for s in args.logits]:
        logits = make_logits(rows, shape, dev)
        row = {"rows": rows, "logits": shape, "read_once_us": 1e6 * logits.numel() * 4 / (bandwidth / 2)}
        for name, extra in cases.items():
            reqs = [Request(f"r{i}", [1], SamplingParams(temperature=0.6, seed=i, **extra), 8, 0, seed=i)
                    for i in range(rows)]
            row[name] = 1e6 * median_seconds(lambda: sample_tokens(logits, reqs), runs=20, warmup=5)
        probs = torch.softmax(logits, -1)
        row["torch.sort"] = 1e6 * median_seconds(lambda: probs.sort(-1, descending=True), runs=20, warmup=5)
        results.append(row)
    print(f"{torch.cuda.get_device_name(dev)}, copy {bandwidth / 1e12:.2f} TB/s; us per call")
    names = list(cases) + ["torch.sort", "read_once_us"]
    print(f"{'rows':>5} {'logits':>6} " + " ".join(f"{n:>16}" for n in names))
    for r in results:
        print(f"{r['rows']:>5} {r['logits']:>6} " + " ".join(f"{r[n]:>16.1f}" for n in names))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(dev),
                                                      "copy_bytes_per_s": bandwidth, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
