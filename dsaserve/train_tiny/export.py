"""Write a trained TinyDSA as an official DeepSeek-V3.2 checkpoint (the names dsaserve.tiny writes).

Weights are stored in bf16 except the indexer's weights_proj and the 1-d biases (fp32, as the official
checkpoints keep them); the MTP layer carries its own copies of the shared embedding and head, as
DeepSeek-V3's checkpoints do. `round_to_stored` makes the module compute with exactly the stored
values, so every number measured on it describes the shipped checkpoint.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file

from dsaserve.config import ModelConfig
from dsaserve.model.checkpoint import shard_files
from dsaserve.tiny import _save_sharded
from dsaserve.train_tiny.model import TinyDSA

Tensor = torch.Tensor
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)$")  # [E, ...] routed experts


def stored_dtype(name: str) -> torch.dtype:
    """By parameter or checkpoint name: both end in "bias" for the fp32 biases."""
    return torch.float32 if "weights_proj" in name or name.endswith("bias") else torch.bfloat16


def _official_names(name: str, experts: int) -> list[str]:
    """Checkpoint names of one module parameter (a stacked expert tensor has one per expert)."""
    match = _STACKED.match(name)
    if match:
        layer, proj = match.groups()
        return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(experts)]
    return [name if name == "lm_head.weight" else f"model.{name}"]


def official_tensors(model: TinyDSA) -> dict[str, Tensor]:
    """Checkpoint name -> tensor (in its stored dtype)."""
    L, E = model.cfg.num_hidden_layers, model.cfg.n_routed_experts
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        keys = _official_names(name, E)
        parts = p.detach().unbind(0) if len(keys) > 1 else [p.detach()]
        out |= {k: t.to(stored_dtype(k)).contiguous() for k, t in zip(keys, parts)}
    out[f"model.layers.{L}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    out[f"model.layers.{L}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def load_checkpoint(path: str | Path) -> TinyDSA:
    """The training module with a checkpoint's weights (to measure a shipped model with this implementation)."""
    cfg = ModelConfig.from_path(path)
    tensors: dict[str, Tensor] = {}
    for file in shard_files(Path(path)):
        tensors |= load_file(str(file))
    model = TinyDSA(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            keys = _official_names(name, cfg.n_routed_experts)
            p.copy_(torch.stack([tensors[k] for k in keys]) if len(keys) > 1 else tensors[keys[0]])
    return model.eval()


def round_to_stored(model: TinyDSA) -> None:
    """Round every parameter through its stored dtype (bf16 weights lose their low mantissa bits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.to(stored_dtype(name)).float())


def write_checkpoint(model: TinyDSA, config: dict[str, Any], out: Path, shards: int = 2) -> int:
    """config.json, generation_config.json and sharded safetensors; returns the bytes of tensors written."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = official_tensors(model)
    _save_sharded(out, tensors, shards=shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
    return sum(t.numel() * t.element_size() for t in tensors.values())
