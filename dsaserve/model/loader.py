"""Load official safetensors checkpoints into DSAModel, shard by shard, straight into device memory.

Handles sharded (model.safetensors.index.json) and single-file checkpoints, FP8 e4m3 weights with
block `weight_scale_inv` (dequantized on load), per-expert tensors stacked into [E, ...] params, and
the MTP layer (checkpoint layer index num_hidden_layers) loaded into `model.mtp`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsaserve.config import ModelConfig
from dsaserve.model.dsa import DSAModel
from dsaserve.parallel.groups import Parallel

Tensor = torch.Tensor
log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OPTIONAL = ("mtp.embed_tokens.weight", "mtp.shared_head.head.weight")  # shared with the main model if absent


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config.json describes; the message names the tensor."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, and for experts an index and row range."""
    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        return f"{self.param}[{self.expert},{self.rows}]" if self.expert is not None else self.param


def shard_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_path / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_path}")
    return files


def shard_rule(param: str) -> tuple[int, str] | None:
    """(dim, group) along which a parameter is split over ranks; None when replicated.

    MLA heads and the vocabulary split over the attention-TP group; dense MLPs, shared and routed
    experts split their intermediate dim over all TP ranks. The indexer is replicated.
    """
    if param.endswith(("q_b_proj.weight", "kv_b_proj.weight", "embed_tokens.weight", "lm_head.weight",
                       "shared_head.head.weight")):
        return 0, "attn"
    if param.endswith(".o_proj.weight"):
        return 1, "attn"
    if param.endswith(("gate_proj.weight", "up_proj.weight", ".w13")):
        return 0, "world"
    if param.endswith(("down_proj.weight", ".w2")):
        return 1, "world"
    return None


def map_name(cfg: ModelConfig, name: str, has_mtp: bool, inter: int) -> Target | None:
    """Checkpoint tensor name -> target parameter (None: not used by this model)."""
    if name == "lm_head.weight":
        return Target("lm_head.weight")
    if not name.startswith("model."):
        return None
    name = name[len("model."):]
    match = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if layer > cfg.num_hidden_layers or (layer == cfg.num_hidden_layers and not has_mtp):
            return None
        name = f"mtp.{rest}" if layer == cfg.num_hidden_layers else name
    expert = _EXPERT.match(name)
    if expert is None:
        return Target(name)
    prefix, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
    if proj == "down_proj":
        return Target(f"{prefix}.w2", e)
    rows = (0, inter) if proj == "gate_proj" else (inter, 2 * inter)
    return Target(f"{prefix}.w13", e, rows)


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """e4m3 weight x per-block multiplier (blocks of block[0] x block[1]) -> fp32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def load_weights(model: DSAModel, model_path: str | Path, progress: bool = True) -> None:
    cfg, path = model.cfg, Path(model_path)
    params = dict(model.named_parameters())
    place = _Placer(model, params)
    expected = _expected_keys(model, params)
    loaded: set[str] = set()
    pending_weights: dict[str, Tensor] = {}  # fp8 weights whose scale is in a later shard
    pending_scales: dict[str, Tensor] = {}
    files = shard_files(path)
    for file in tqdm(files, desc="Loading shards", unit="shard", disable=not progress):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if not name.endswith("_scale_inv") and f.get_slice(name).get_dtype() != "F8_E4M3":
                    place(name, f.get_slice(name), loaded)  # reads only this rank's part of the tensor
                    continue
                tensor = f.get_tensor(name)
                if name.endswith("_scale_inv"):
                    weight_name = name[: -len("_scale_inv")]
                    if weight_name in pending_weights:
                        tensor = dequantize_fp8(pending_weights.pop(weight_name), tensor, _block(cfg, name))
                        place(weight_name, tensor, loaded)
                    else:
                        pending_scales[weight_name] = tensor
                    continue
                if name not in pending_scales:
                    pending_weights[name] = tensor
                    continue
                place(name, dequantize_fp8(tensor, pending_scales.pop(name), _block(cfg, name)), loaded)
    if pending_weights:
        raise CheckpointError(f"fp8 tensor {next(iter(pending_weights))} has no weight_scale_inv")
    for key in _OPTIONAL:
        if key in expected and key not in loaded:
            source = "embed_tokens.weight" if "embed" in key else "lm_head.weight"
            params[key].data.copy_(params[source].data)
            loaded.add(key)
    if cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        params["lm_head.weight"].data.copy_(params["embed_tokens.weight"].data)
        loaded.add("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s), first: {_readable(missing[0], cfg)}")


def _block(cfg: ModelConfig, name: str) -> tuple[int, int]:
    if cfg.fp8_block is None:
        raise CheckpointError(f"{name}: fp8 scales present but config.json has no fp8 quantization_config")
    return cfg.fp8_block


class _Placer:
    """Copies one checkpoint tensor into its parameter: this rank's shard of it, checked for shape.
    The source is a tensor or a safetensors slice (then only the shard is read from disk)."""

    def __init__(self, model: DSAModel, params: dict[str, torch.nn.Parameter]):
        self.cfg, self.params, self.par = model.cfg, params, model.par
        self.has_mtp = model.mtp is not None
        self.inter = self.cfg.moe_intermediate_size // self.par.tp

    def __call__(self, name: str, source: Any, loaded: set[str]) -> None:
        target = map_name(self.cfg, name, self.has_mtp, self.inter)
        if target is None:
            log.debug("ignoring checkpoint tensor %s", name)
            return
        param = self.params.get(target.param)
        if param is None:
            raise CheckpointError(f"unexpected tensor {name}: the model has no parameter {target.param}")
        dest = param.data
        if target.expert is not None:
            dest = dest[target.expert]
            if target.rows is not None:
                dest = dest[target.rows[0]:target.rows[1]]
        rule = shard_rule(target.param)
        expected = list(dest.shape)
        shape = list(source.shape) if isinstance(source, Tensor) else list(source.get_shape())
        part = tuple(slice(None) for _ in shape)
        if rule is not None:
            dim, group = rule
            ranks, index = ((self.par.cfg.attn_tp, self.par.cfg.attn_rank) if group == "attn"
                            else (self.par.tp, self.par.cfg.rank))
            expected[dim] *= ranks
            if shape == expected:
                start = index * dest.shape[dim]
                part = part[:dim] + (slice(start, start + dest.shape[dim]),) + part[dim + 1:]
        tensor = source[part]
        if list(tensor.shape) != list(dest.shape):
            raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)}, expected {expected}")
        dest.copy_(tensor)
        loaded.add(target.key)


def _expected_keys(model: DSAModel, params: dict[str, torch.nn.Parameter]) -> set[str]:
    cfg, keys = model.cfg, set()
    inter = cfg.moe_intermediate_size // model.par.tp
    for name in params:
        if name.endswith(".experts.w13"):
            for e in range(cfg.n_routed_experts):
                keys |= {Target(name, e, (0, inter)).key, Target(name, e, (inter, 2 * inter)).key}
        elif name.endswith(".experts.w2"):
            keys |= {Target(name, e).key for e in range(cfg.n_routed_experts)}
        else:
            keys.add(name)
    return keys


def _readable(key: str, cfg: ModelConfig) -> str:
    """Turn an internal key back into the checkpoint's tensor name for error messages."""
    match = re.match(r"^(.*)\.w(13|2)\[(\d+),(.*)\]$", key)
    if match:
        proj = "down_proj" if match.group(2) == "2" else ("gate_proj" if match.group(4).startswith("(0,") else "up_proj")
        key = f"{match.group(1)}.{match.group(3)}.{proj}.weight"
    if key.startswith("mtp."):
        key = f"layers.{cfg.num_hidden_layers}.{key[len('mtp.'):]}"
    return key if key == "lm_head.weight" else f"model.{key}"


def build_model(model_path: str | Path, device: torch.device, dtype: torch.dtype, par: Parallel | None = None,
                load_mtp: bool = True, progress: bool = True) -> DSAModel:
    """Allocate this rank's shard of the model uninitialised on `device` and fill it from the checkpoint."""
    cfg = ModelConfig.from_path(model_path)
    with torch.device("meta"):
        model = DSAModel(cfg, par, load_mtp=load_mtp)
    fp32 = model.fp32_parameter_names()
    for name, param in model.named_parameters():  # still on meta: dtype changes cost nothing
        param.requires_grad_(False)
        param.data = param.data.to(torch.float32 if name in fp32 else dtype)
    _check_fits(model, device, dtype)
    model.to_empty(device=device)
    load_weights(model, model_path, progress=progress)
    return model.eval()


def _check_fits(model: DSAModel, device: torch.device, dtype: torch.dtype) -> None:
    """Fail before loading when this rank's weights cannot fit, instead of minutes later with an OOM."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ValueError(
                f"this rank's weights need {need / 2**30:.1f} GiB in {dtype} but {device} has {free / 2**30:.1f} GiB "
                f"free; FP8 checkpoints are dequantized on load (native FP8 weights are not supported yet): "
                f"use more ranks (--tp) or GPUs with more memory")
    elif need > 32 * 2**30:
        log.warning("loading %.0f GiB of weights into host memory: no CUDA device is in use (--device %s)",
                    need / 2**30, device)
