"""Load official safetensors checkpoints into DSAModel, shard by shard, straight into device memory.

Handles sharded (model.safetensors.index.json) and single-file checkpoints, per-expert tensors
stacked into [E, ...] params, and the MTP layer (checkpoint layer index num_hidden_layers) loaded
into `model.mtp`. FP8 e4m3 weights with `weight_scale_inv` blocks stay FP8 (model/quant.py): each
rank reads its slice of the weight and the matching scale blocks, nothing else; the few weights
the model reads as matrices are dequantized slice by slice at load.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsaserve.config import ModelConfig, names_module
from dsaserve.engine.layout import checks_enabled
from dsaserve.model import quant
from dsaserve.model.checkpoint import Checkpoint, CheckpointError
from dsaserve.model.dsa import DSAModel, fuse_projections
from dsaserve.ops.fp8 import FP8, dequantize
from dsaserve.parallel.groups import Parallel, ParallelConfig
from dsaserve.server_args import SettingError

Tensor = torch.Tensor
log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED_EXPERT = re.compile(r"^(.*\.mlp)\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
_SCALE = "_scale_inv"
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors names of what a float parameter is copied from
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # the MTP layer uses the target's (dsa.MTPLayer)


def shard_rule(param: str) -> tuple[int, str] | None:
    """(dim, group) along which a parameter is split over ranks; None when replicated.

    MLA heads and the vocabulary split over the attention-TP group; dense MLPs and shared experts split their
    intermediate dim over all TP ranks, routed experts over the ranks that hold them (all of them without --ep:
    group "experts"). The indexer is replicated.
    """
    if _EXPERT.match(param):
        return (1 if param.endswith("down_proj.weight") else 0), "experts"
    if param.endswith(("q_b_proj.weight", "kv_b_proj.weight", "embed_tokens.weight", "lm_head.weight",
                       "shared_head.head.weight")):
        return 0, "attn"
    if param.endswith(".o_proj.weight"):
        return 1, "attn"
    if param.endswith(("gate_proj.weight", "up_proj.weight")):
        return 0, "world"
    if param.endswith("down_proj.weight"):
        return 1, "world"
    return None


def rank_part(key: str, local: tuple[int, ...], par: ParallelConfig) -> tuple[list[int], tuple[slice, ...]]:
    """The full shape of a parameter whose shard on rank `par` is `local`-shaped, and that rank's slice of it
    (shard_rule: split over the attention-TP group, over all TP ranks or over an expert's ranks; replicated
    otherwise)."""
    full, part = list(local), [slice(None)] * len(local)
    rule = shard_rule(key)
    if rule is not None:
        dim, group = rule
        ranks, index = {"attn": (par.attn_tp, par.attn_rank), "world": (par.tp, par.rank),
                        "experts": (par.moe_tp, par.moe_rank)}[group]
        full[dim] *= ranks
        part[dim] = slice(index * local[dim], (index + 1) * local[dim])
    return full, tuple(part)


def map_name(cfg: ModelConfig, name: str, has_mtp: bool) -> str | None:
    """Checkpoint tensor name -> the model's key for it (None: not used by this model). Keys are
    parameter names, except routed experts: `<...>.mlp.experts.<e>.<proj>.weight`, one per tensor."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        return None
    name = name[len("model."):]
    match = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if layer > cfg.num_hidden_layers or (layer == cfg.num_hidden_layers and not has_mtp):
            return None
        shared = layer < cfg.num_hidden_layers and cfg.indexer_types[layer] == "shared"
        if shared and rest.startswith("self_attn.indexer."):
            return None  # config.json shares this layer's top-k (IndexCache on any checkpoint): unused
        if layer == cfg.num_hidden_layers:
            if rest in _MTP_SHARED:
                return None
            name = f"mtp.{rest}"
    return name


def checkpoint_name(key: str, cfg: ModelConfig) -> str:
    """A model key back to the checkpoint's tensor name (format choice, error messages)."""
    if key.startswith("mtp."):
        key = f"layers.{cfg.num_hidden_layers}.{key[len('mtp.'):]}"
    return key if key == "lm_head.weight" else f"model.{key}"


def select_formats(model: DSAModel, is_fp8: Callable[[str], bool]) -> None:
    """Switch every module whose checkpoint weight is e4m3 (`is_fp8(checkpoint tensor name)`) to FP8, on
    meta, before allocation."""
    for path, module in model.named_modules():
        if isinstance(module, quant.Linear) and not path.endswith(quant.DEQUANTIZED_AT_LOAD):
            name = checkpoint_name(f"{path}.weight", model.cfg)
        elif isinstance(module, quant.Experts):
            name = checkpoint_name(f"{path}.0.gate_proj.weight", model.cfg)
        else:
            continue
        if is_fp8(name):
            module.to_fp8(_block(model.cfg, name))


def load_weights(model: DSAModel, ckpt: Checkpoint, progress: bool = True) -> None:
    cfg = model.cfg
    params = dict(model.named_parameters())
    expected = _expected_keys(model, params)
    loaded: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(file: Path) -> Any:
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            return handles[file]

        place = _Placer(model, params, ckpt, handle)
        for file in tqdm(ckpt.files, desc="Loading shards", unit="shard", disable=not progress):
            for name in ckpt.names_in(file):
                if not name.endswith(_SCALE):  # scales are read with their weight
                    place(name, loaded)
    if cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        params["lm_head.weight"].data.copy_(params["embed_tokens.weight"].data)
        loaded.add("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} is missing {len(missing)} tensor(s), first: "
                              f"{checkpoint_name(missing[0], cfg)}")


def _block(cfg: ModelConfig, name: str) -> tuple[int, int]:
    if cfg.fp8_block is None:
        raise CheckpointError(f"{name}: fp8 tensor present but config.json has no fp8 quantization_config")
    return cfg.fp8_block


class _Placer:
    """Copies this rank's slice of one checkpoint tensor into its parameter, checked for shape, reading
    only that slice from disk (and for FP8 only the scale blocks that cover it)."""

    def __init__(self, model: DSAModel, params: dict[str, torch.nn.Parameter], ckpt: Checkpoint, handle: Any):
        self.model, self.cfg, self.params, self.par = model, model.cfg, params, model.par
        self.ckpt, self.handle = ckpt, handle
        self.has_mtp = model.mtp is not None
        self.modules = dict(model.named_modules())
        self.fused = fused_sources(model)

    def __call__(self, name: str, loaded: set[str]) -> None:
        key = map_name(self.cfg, name, self.has_mtp)
        if key is None:
            log.debug("ignoring checkpoint tensor %s", name)
            return
        destination = self._destination(name, key)
        if destination is None:
            log.debug("%s: another rank's expert (--ep)", name)
            return
        dest, dest_scale = destination
        info = self.ckpt.tensors[name]
        part = self._part(name, key, info.shape, dest.shape)
        source = self.handle(info.file).get_slice(name)
        if info.dtype != "F8_E4M3":
            if info.dtype.startswith("F8_"):  # copied as is, its scale blocks would be left out: values off by them
                raise CheckpointError(f"tensor {name} is {info.dtype}: dsaserve loads block FP8 in e4m3 (F8_E4M3) "
                                      f"only")
            if name + _SCALE in self.ckpt.tensors:  # an FP8 weight cast without its scale, or e4m3 bytes as U8
                raise CheckpointError(f"tensor {name} is {info.dtype} but has {name}{_SCALE} beside it: a block "
                                      f"FP8 weight must be F8_E4M3 (its scale would be dropped)")
            if info.dtype not in _FLOAT_DTYPES and dest.is_floating_point():  # (copied, integers became values)
                raise CheckpointError(f"tensor {name} is {info.dtype}: expected a floating-point dtype "
                                      f"({', '.join(_FLOAT_DTYPES)})")
            if dest_scale is not None:
                raise CheckpointError(f"tensor {name} is {info.dtype}, but this model keeps the module in FP8 "
                                      f"(its other weights are e4m3)")
            dest.copy_(source[part])
        else:
            if len(info.shape) != 2:
                raise CheckpointError(f"tensor {name} is F8_E4M3 of shape {list(info.shape)}: block FP8 tensors are "
                                      f"matrices")
            block = _block(self.cfg, name)
            scale = self._scale(name, info.shape, block)
            exact = dest_scale is not None
            blocks, offset = _block_part(name, part, info.shape, block, exact)
            if exact:  # stays FP8: the weight slice and its scale blocks, as stored
                dest.copy_(source[part])
                s = scale[blocks]
                if tuple(s.shape) != tuple(dest_scale.shape):
                    raise CheckpointError(f"tensor {name}{_SCALE}: this rank's blocks have shape {list(s.shape)}, "
                                          f"expected {list(dest_scale.shape)}")
                dest_scale.copy_(s)
            else:  # read as a matrix by the model: dequantized here, once
                dest.copy_(dequantize(source[part], scale[blocks], block, offset))
        loaded.add(key)

    def _destination(self, name: str, key: str) -> tuple[Tensor, Tensor | None] | None:
        """Where this rank keeps the tensor (weight, and its scale blocks in FP8); None: another rank's expert."""
        expert = _EXPERT.match(key)
        if expert is not None:
            module, index = self.modules.get(expert.group(1)), int(expert.group(2))
            if not isinstance(module, quant.Experts) or index >= self.cfg.n_routed_experts:
                raise CheckpointError(f"unexpected tensor {name}: the model has no routed expert {index} there "
                                      f"({self.cfg.n_routed_experts} experts, MoE layers per mlp_layer_types)")
            local = module.local_index(index)
            return None if local is None else module.slot(expert.group(3), local)
        shared = _SHARED_EXPERT.match(key)
        module = self.modules.get(f"{shared.group(1)}.experts") if shared is not None else None
        if isinstance(module, quant.Experts) and module.shared_slot is not None:  # stacked after the routed ones
            return module.slot(shared.group(2), module.shared_slot)
        if key in self.fused:  # this tensor's rows of a fused module (and their scale blocks)
            _, fused, start, rows = self.fused[key]
            weight = fused.weight.data[start:start + rows]
            if fused.block is None:
                return weight, None
            first = start // fused.block[0]
            return weight, fused.weight_scale_inv.data[first:first + -(-rows // fused.block[0])]
        param = self.params.get(key)
        if param is None:
            raise CheckpointError(f"unexpected tensor {name}: the model has no parameter {key}")
        owner = self.modules[key.rsplit(".", 1)[0]] if "." in key else self.model
        if isinstance(owner, quant.Linear) and owner.block is not None:
            return param.data, owner.weight_scale_inv.data
        return param.data, None

    def _part(self, name: str, key: str, shape: tuple[int, ...], dest: torch.Size) -> tuple[slice, ...]:
        """This rank's slice of a tensor of full `shape` whose shard is `dest`-shaped."""
        expected, part = rank_part(key, tuple(dest), self.par.cfg)
        if list(shape) != expected:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {expected}")
        return part

    def _scale(self, name: str, shape: tuple[int, ...], block: tuple[int, int]) -> Any:
        scale_name = name + _SCALE
        info = self.ckpt.tensors.get(scale_name)
        if info is None:
            raise CheckpointError(f"fp8 tensor {name} has no {scale_name}")
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {scale_name} is {info.dtype}: block scales are floating-point (F32)")
        want = [-(-n // b) for n, b in zip(shape, block)]
        if list(info.shape) != want:
            raise CheckpointError(f"tensor {scale_name} has shape {list(info.shape)}, expected {want} "
                                  f"({list(shape)} in blocks of {list(block)})")
        return self.handle(info.file).get_slice(scale_name)


def _block_part(name: str, part: tuple[slice, ...], shape: tuple[int, ...], block: tuple[int, int],
                exact: bool) -> tuple[tuple[slice, ...], tuple[int, int]]:
    """The scale blocks covering a weight slice, and where the slice starts inside its first block.
    exact: the slice must start and end on block boundaries (the tensor stays FP8 on this rank)."""
    blocks, offset = [], []
    for dim, (s, n, b) in enumerate(zip(part, shape, block)):
        start, stop, _ = s.indices(n)
        if exact and (start % b or (stop % b and stop != n)):
            what = ("rows", "columns")[dim]
            raise CheckpointError(
                f"tensor {name}: this rank's {what} [{start}, {stop}) of {n} split a {block[0]}x{block[1]} FP8 "
                f"scale block (weight_block_size): a TP split must fall on multiples of {b} {what}; choose a "
                f"--tp / --dp that divides this dimension into whole blocks")
        blocks.append(slice(start // b, -(-stop // b)))
        offset.append(start % b)
    return tuple(blocks), (offset[0], offset[1])


def _expected_keys(model: DSAModel, params: dict[str, torch.nn.Parameter]) -> set[str]:
    fused = fused_sources(model)
    keys = set(fused)
    fused_params = {f"{path}.weight" for path, *_ in fused.values()}
    for name in params:
        if name in fused_params:
            continue
        if name.endswith(".experts.w13"):
            prefix = name[: -len(".w13")]
            experts = model.get_submodule(prefix)
            mine = range(experts.first_expert, experts.first_expert + experts.num_experts)  # all but with --ep
            keys |= {f"{prefix}.{e}.{proj}.weight" for e in mine for proj in ("gate_proj", "up_proj", "down_proj")}
            if experts.shared_slot is not None:  # the shared expert, stacked
                keys |= {f"{prefix[: -len('.experts')]}.shared_experts.{proj}.weight"
                         for proj in ("gate_proj", "up_proj", "down_proj")}
        elif not name.endswith((".experts.w2", _SCALE)):
            keys.add(name)
    return keys


def meta_model(cfg: ModelConfig, par: Parallel | None, dtype: torch.dtype, load_mtp: bool,
               is_fp8: Callable[[str], bool]) -> DSAModel:
    """One rank's model on the meta device with every parameter in its final format and dtype: what
    build_model allocates and what the memory planner counts (one accounting, dsaserve/planner.py)."""
    with torch.device("meta"):
        model = DSAModel(cfg, par, load_mtp=load_mtp)
    select_formats(model, is_fp8)
    check_fp8_splits(model)
    fp32 = model.fp32_parameter_names()
    for name, param in model.named_parameters():  # on meta: dtype changes cost nothing
        param.requires_grad_(False)
        if param.dtype != FP8:
            param.data = param.data.to(torch.float32 if name in fp32 else dtype)
    with torch.device("meta"):
        fuse_projections(model)
    return model


def check_fp8_splits(model: DSAModel) -> None:
    """Refuse, before anything is allocated or read, a TP split that cuts a scale block of a weight that
    stays FP8: the loader's own rule (`_block_part`) on this rank's slice of every such tensor, so that
    `dsaserve plan` and every rank at start-up say so from config.json alone."""
    par = model.par.cfg
    for path, module in model.named_modules():
        if isinstance(module, quant.Linear) and module.block is not None:
            local = {f"{path}.weight": tuple(module.weight.shape)}
        elif isinstance(module, quant.Experts) and module.block is not None:
            local = {f"{path}.0.gate_proj.weight": (module.inter, module.hidden),
                     f"{path}.0.down_proj.weight": (module.hidden, module.inter)}
        else:
            continue
        for key, shape in local.items():
            full, part = rank_part(key, shape, par)
            _block_part(checkpoint_name(key, model.cfg), part, tuple(full), module.block, exact=True)


def fused_sources(model: torch.nn.Module) -> dict[str, tuple[str, quant.Linear, int, int]]:
    """Model keys of checkpoint tensors that load into rows of a fused Linear (quant.concat_rows):
    key -> (the fused module's path, the module, first row, rows)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, quant.Linear):
            parent = path.rsplit(".", 1)[0]
            for name, start, rows in module.sources:
                out[f"{parent}.{name}.weight"] = (path, module, start, rows)
    return out


def fp8_by_config(cfg: ModelConfig) -> Callable[[str], bool]:
    """Which tensors a checkpoint of this config has in FP8, from config.json alone (the planner, and
    `--load-format dummy`): every linear layer the loader may keep in FP8, when the config quantizes, but for the
    modules its quantization_config leaves unquantized (modules_to_not_convert / ignored_layers)."""
    if cfg.fp8_block is None:
        return lambda name: False
    return lambda name: not names_module(name.removesuffix(".weight"), cfg.fp8_unquantized)


def weight_formats(cfg: ModelConfig, ckpt: Checkpoint | None) -> Callable[[str], bool]:
    """Which checkpoint tensors load as FP8: the shards' own dtypes (a dequantized copy may keep config.json's
    quantization_config), or config.json's without shards (`--load-format dummy`; the planner on a folder with
    config.json only)."""
    return ckpt.is_fp8 if ckpt is not None else fp8_by_config(cfg)


def allocate(model: DSAModel, device: torch.device) -> None:
    """Every meta parameter and buffer as an uninitialised tensor on `device`. (Module.to_empty's empty_like on
    meta tensors imports sympy, 0.7 s per process: dense tensors by shape instead.)"""
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def build_model(model_path: str | Path, device: torch.device, dtype: torch.dtype, par: Parallel | None = None,
                load_mtp: bool = True, progress: bool = True, load_format: str = "auto",
                overrides: dict[str, Any] | None = None, batch_invariant: bool = False) -> DSAModel:
    """Allocate this rank's shard of the model uninitialised on `device` and fill it from the checkpoint
    (load_format "dummy": with random weights, config.json only). FP8 weights stay e4m3 (+ fp32 scales);
    other parameters take `dtype` (or fp32 where the model says). overrides: config.json fields replaced.
    batch_invariant: every Linear takes each row's product by ops.invariant (deterministic inference)."""
    cfg = ModelConfig.from_path(model_path, overrides)
    ckpt = Checkpoint(model_path) if load_format != "dummy" else None
    model = meta_model(cfg, par, dtype, load_mtp, weight_formats(cfg, ckpt))
    _check_fits(model, device, dtype)
    allocate(model, device)
    if ckpt is None:
        from dsaserve.model.dummy import init_dummy_weights
        init_dummy_weights(model)
    else:
        for module in model.modules():
            if isinstance(module, quant.Experts):
                module.zero_padding()
        load_weights(model, ckpt, progress=progress)
    quant.prepare(model, quant.default_mode(device), dtype, checks=checks_enabled(), batch_invariant=batch_invariant,
                  progress=progress)
    return model.eval()


def _check_fits(model: DSAModel, device: torch.device, dtype: torch.dtype) -> None:
    """Fail before loading when this rank's weights cannot fit, instead of minutes later with an OOM."""
    from dsaserve.planner import dequantized_bytes, weight_bytes
    need = sum(weight_bytes(model).values())
    if quant.default_mode(device) == "dequantized":  # (CUDA without Triton: bf16 copies beside the FP8 weights)
        need += dequantized_bytes(model, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            fp8 = sum(p.numel() for p in model.parameters() if p.dtype == FP8)
            raise SettingError(
                f"this rank's weights need {need / 2**30:.1f} GiB ({fp8 / 2**30:.1f} GiB of it FP8, the rest in "
                f"{dtype} / fp32) but {device} has {free / 2**30:.1f} GiB free: use more ranks (--tp) or GPUs "
                f"with more memory")
    elif need > 32 * 2**30:
        log.warning("loading %.0f GiB of weights into host memory: no CUDA device is in use (--device %s)",
                    need / 2**30, device)
