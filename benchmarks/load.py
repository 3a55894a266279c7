"""Checkpoint load: the loader's read rate against a plain read() of the same shards (the ceiling, page cache as
the previous pass left it), then build_model's time (FP8 dequantized on CPU) and the process's peak RSS:

    python benchmarks/load.py MODEL_DIR [--device cpu] [--rounds 2] [--output-json load.json]

A full-width FP8 checkpoint of a few layers: dsaserve.tiny.make_tiny_model with benchmarks/engine.py's
DEEPSEEK_V32_LAYER (engine.py --fp8 writes one)."""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from dsaserve.config import ModelConfig
from dsaserve.model import loader
from dsaserve.model.checkpoint import Checkpoint, shard_files


def read_s(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def load_weights_s(path: str, device: torch.device) -> float:
    """load_weights alone: the shards into a model allocated by shape (no dequantize, no kernels)."""
    cfg, ckpt = ModelConfig.from_path(path), Checkpoint(path)
    model = loader.meta_model(cfg, None, torch.bfloat16, True, loader.weight_formats(cfg, ckpt))
    loader.allocate(model, device)
    start = time.perf_counter()
    loader.load_weights(model, ckpt, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    device, files = torch.device(args.device), shard_files(Path(args.model_path))
    size = sum(f.stat().st_size for f in files)
    rows = []
    for r in range(args.rounds):
        raw, load = read_s(files), load_weights_s(args.model_path, device)
        rows.append(dict(round=r, read_gb_s=size / raw / 1e9, load_gb_s=size / load / 1e9, ratio=raw / load))
    start = time.perf_counter()
    loader.build_model(args.model_path, device, torch.bfloat16)
    build = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # (KiB on Linux)
    print(f"\n{size / 1e9:.2f} GB of shards, device {device}")
    print(f"{'round':>5} {'read() GB/s':>12} {'load_weights GB/s':>18} {'of read()':>10}")
    for row in rows:
        print(f"{row['round']:>5} {row['read_gb_s']:>12.2f} {row['load_gb_s']:>18.2f} {row['ratio']:>10.2f}")
    print(f"build_model {build:.1f} s, peak RSS {peak:.1f} GB")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(dict(rounds=rows, build_s=build, peak_rss_gb=peak), indent=1))


if __name__ == "__main__":
    main()
