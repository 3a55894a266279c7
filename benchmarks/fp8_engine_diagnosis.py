"""Which Triton component moves the FP8 engine's tokens: each swapped in alone against the fp32 torch
emulation of the FP8 model, on the tiny models of both architectures; then the FP8 KV cache runs against
the fp32 torch run over the same cache. Prints max chosen log-prob errors (nats) and where tokens part.

    python benchmarks/fp8_engine_diagnosis.py [--kv-only]       (CUDA; about 3 minutes on an H200)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_triton_engine import Run, _first_diff, _greedy, _lp_errors, _prompts  # noqa: E402

from dsaserve.tiny import make_tiny_model  # noqa: E402

ARCHS = ("deepseek_v32", "glm_moe_dsa")


def run(path: str, attention: str, moe: str, dtype: str, prompts: list[list[int]], kv: str = "auto",
        fp8_mode: str | None = None, one_by_one: bool = False) -> Run:
    if one_by_one:  # batch composition only: each prompt alone through the same engine configuration
        return [row for p in prompts for row in run(path, attention, moe, dtype, [p], kv, fp8_mode)]
    return _greedy(path, attention, dtype, prompts, kv, fp8_mode, moe_backend=moe)


def report(label: str, candidate: Run, truth: Run) -> None:
    parts = [_first_diff(a[0], b[0]) for a, b in zip(candidate, truth)]
    errors = _lp_errors(candidate, truth)
    print(f"  {label:40s} error mean {sum(errors) / max(len(errors), 1):.4f} max {max(errors, default=0):.4f}  "
          f"tokens part at steps {parts}", flush=True)


def main() -> None:
    root = Path("/tmp/dsaserve-fp8-diagnosis")
    start = time.perf_counter()
    for arch in ARCHS if "--kv-only" not in sys.argv else ():
        path = str(make_tiny_model(root / f"{arch}-fp8", arch, fp8=True))
        for seed in (3, 4):
            prompts = _prompts(seed)
            print(f"FP8 weights, {arch}, prompts {seed}, fp32, against the torch emulation", flush=True)
            truth = run(path, "torch", "torch", "float32", prompts, fp8_mode="emulate")
            report("emulation, prompts one at a time", run(path, "torch", "torch", "float32", prompts,
                                                          fp8_mode="emulate", one_by_one=True), truth)
            report("dequantized weights, no FP8 activations", run(path, "torch", "torch", "float32", prompts,
                                                                 fp8_mode="dequantized"), truth)
            report("Triton FP8 GEMM only", run(path, "torch", "torch", "float32", prompts, fp8_mode="kernels"), truth)
            report("Triton FP8 MoE only", run(path, "torch", "triton", "float32", prompts, fp8_mode="emulate"), truth)
            report("Triton attention only", run(path, "triton", "torch", "float32", prompts, fp8_mode="emulate"), truth)
            report("all Triton", run(path, "triton", "triton", "float32", prompts), truth)
    for arch in ARCHS:
        path = str(make_tiny_model(root / arch, arch))
        for seed in (1, 5, 6):
            prompts = _prompts(seed)
            print(f"FP8 KV cache, {arch}, prompts {seed}, against torch fp32 over the FP8 cache", flush=True)
            truth = run(path, "torch", "torch", "float32", prompts, "fp8_e4m3")
            report("all Triton, fp32", run(path, "triton", "triton", "float32", prompts, "fp8_e4m3"), truth)
            report("torch, bf16", run(path, "torch", "torch", "bfloat16", prompts, "fp8_e4m3"), truth)
            report("all Triton, bf16", run(path, "triton", "triton", "bfloat16", prompts, "fp8_e4m3"), truth)
            report("Triton attention only, bf16", run(path, "triton", "torch", "bfloat16", prompts, "fp8_e4m3"), truth)
            report("Triton MoE only, bf16", run(path, "torch", "triton", "bfloat16", prompts, "fp8_e4m3"), truth)
            report("torch, bf16, bf16 cache", run(path, "torch", "torch", "bfloat16", prompts), truth)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
