"""A model folder shaped as ONE rank of a `--tp N` deployment of DeepSeek-V3.2 (or GLM-5): attention heads,
the dense and expert intermediate dims and the vocabulary divided by N, the replicated parts (q_a / kv_a, the
indexer, the router) whole, all layers. Served with random weights on one GPU it measures a rank's step
without its collectives:

    python benchmarks/rank_slice.py /tmp/v32-tp8 --tp 8
    dsaserve bench one-batch --model-path /tmp/v32-tp8 --load-format dummy --kv-cache-dtype fp8_e4m3 \\
        --cuda-graph-bs 1 16 64 --batch-size 1 16 64 --input-len 1024 --output-len 32 --output-json r.json

(FP8 as the official checkpoint: 84 GiB of weights at --tp 8, 61 layers; `--bf16` drops config.json's
quantization_config, so the same shapes load as bf16 weights, about twice the bytes: with `--layers` to fit one
GPU, the FP8 step next to the bf16 one. The folder holds config.json and the embedded model's tokenizer files,
which a dummy load reads.)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dsaserve.model.checkpoint import default_model_path

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "configs"
SPLIT = ("num_attention_heads", "num_key_value_heads", "moe_intermediate_size", "intermediate_size", "vocab_size")


def write_rank_slice(out: Path, arch: str, tp: int, layers: int | None, bf16: bool = False) -> dict:
    cfg = json.loads((CONFIGS / f"{arch}.json").read_text())
    if bf16:
        cfg.pop("quantization_config", None)
    for key in SPLIT:
        if cfg[key] % tp:
            raise ValueError(f"{key}={cfg[key]} is not divisible by --tp {tp}")
        cfg[key] //= tp
    if layers is not None:  # per-layer lists (GLM-5.2's indexer_types, mlp_layer_types) keep their first layers
        per_layer = [k for k, v in cfg.items() if isinstance(v, list) and len(v) == cfg["num_hidden_layers"]]
        cfg.update({k: cfg[k][:layers] for k in per_layer}, num_hidden_layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    for f in default_model_path().glob("*.json"):  # the tokenizer files (token ids past its vocabulary decode to "")
        if "safetensors" not in f.name and f.name not in ("config.json", "training_report.json"):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arch", choices=["deepseek_v32", "glm_moe_dsa", "glm_5_2"], default="deepseek_v32")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="default: the model's own")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (no quantization_config)")
    ns = ap.parse_args()
    cfg = write_rank_slice(Path(ns.out), ns.arch, ns.tp, ns.layers, ns.bf16)
    print(f"{ns.out}: one rank of --tp {ns.tp}: " + ", ".join(f"{k} {cfg[k]}" for k in SPLIT)
          + f", {cfg['num_hidden_layers']} layers, {'bf16' if ns.bf16 else 'FP8'} weights")


if __name__ == "__main__":
    main()
