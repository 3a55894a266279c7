"""Memory planning: one rank's weight bytes by component, KV bytes per token, and the KV tokens that fit.

`dsaserve plan` reads config.json (and, where the weights are in the folder, only their shards' headers); the
engine uses the same functions at start-up on the model it actually built (`weight_bytes` of the loaded model,
`kv_pool_tokens` for the pool), and logs the same numbers. FP8 checkpoints keep their block-quantized linear and
expert weights in e4m3 plus fp32 scales (the official checkpoints quantize every such weight; the model keeps the
matrices it reads directly, `quant.DEQUANTIZED_AT_LOAD`, in the compute dtype).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dsaserve.cache.pools import KVPools, resolve_kv_cache_dtype
from dsaserve.config import ModelConfig
from dsaserve.engine.admission import pages_to_admit
from dsaserve.model.checkpoint import Checkpoint
from dsaserve.parallel.groups import Parallel, ParallelConfig
from dsaserve.server_args import ServerArgs, SettingError

# Components, matched in order against parameter names (the first match wins).
COMPONENTS = (("mtp", "mtp."), ("routed experts", ".experts."), ("shared experts", ".shared_experts."),
              ("indexer", ".indexer."), ("attention", ".self_attn."), ("router", ".mlp.gate."), ("dense MLP", ".mlp."),
              ("embedding", "embed_tokens"), ("lm_head", "lm_head"), ("norms", "norm"))


@dataclass(frozen=True)
class MemoryPlan:
    weights: dict[str, int]  # bytes per component, on one rank
    kv_bytes_per_token: int
    device_bytes: int
    kv_tokens: int  # tokens the KV pool holds (0 when the weights, or then the pages a request starts with, do not fit)
    kv_pool_bytes: int = 0  # what the engine allocates for them: whole pages and the reserved page 0 (pool_pages)
    problem: str = ""  # a pool the flags ask for that cannot fit (--max-total-tokens), named

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def fits(self) -> bool:
        return self.weight_bytes < self.device_bytes and self.kv_tokens > 0


def _component(name: str) -> str:
    return next((c for c, key in COMPONENTS if key in name), "other")


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter by component (works on the meta device: shapes and dtypes only). A shared
    expert stacked with the routed ones (quant.Experts.shared_slot) counts as shared: one slot's share."""
    from dsaserve.model.quant import Experts
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = _component(name)
        out[part] = out.get(part, 0) + p.numel() * p.element_size()
    for path, m in model.named_modules():
        if isinstance(m, Experts) and m.shared_slot is not None and _component(f"{path}.") == "routed experts":
            shared = sum(p.numel() * p.element_size() for p in m.parameters()) // m.slots
            out["routed experts"] -= shared
            out["shared experts"] = out.get("shared experts", 0) + shared
    return out


def dequantized_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the `dtype` copies that quant.prepare's "dequantized" mode (the CPU, and CUDA without Triton)
    keeps beside every FP8 weight: such a model takes more memory than a plain `dtype` load."""
    from dsaserve.ops.fp8 import FP8
    return sum(p.numel() for p in model.parameters() if p.dtype == FP8) * dtype.itemsize


def cache_layers(cfg: ModelConfig, spec_steps: int) -> int:
    """Layers with KV caches: the model's, plus the MTP layer's when it drafts."""
    return cfg.num_hidden_layers + (1 if spec_steps else 0)


def kv_budget(args: ServerArgs, free_before_weights: int, free_after_weights: int) -> int:
    """The bytes --mem-fraction (SGLang's --mem-fraction-static, its rule) leaves the KV pool: the weights and the
    pool take that share of the memory free before the weights load, the rest stays free for activations, CUDA
    graphs and communication buffers. Negative where the weights alone take more."""
    return free_after_weights - int((1 - args.mem_fraction) * free_before_weights)


def pool_source(args: ServerArgs, free_before_weights: int) -> str:
    """What sized the pool, for a message that says it is too small."""
    if args.max_total_tokens is not None:
        return "raise --max-total-tokens"
    return (f"the weights and the pool may take --mem-fraction {args.mem_fraction} of the "
            f"{free_before_weights / 2**30:.2f} GiB free before the weights loaded: raise it, or spread the weights "
            "over more ranks (--tp)")


def pool_pages(tokens: int, page_size: int) -> int:
    """The pages of a KV pool of `tokens` (kv_pool_tokens): its whole pages, and page 0, which is never handed out
    (dummy rows write there)."""
    return tokens // page_size + 1


def kv_pool_tokens(args: ServerArgs, free_bytes: int, bytes_per_token: int, context_length: int,
                   budget_bytes: int) -> int:
    """The KV pool's tokens, as the engine sizes it at start-up: --max-total-tokens when given, else the
    budget_bytes kv_budget leaves, at most what a DP group's share of --max-running-requests
    (ServerArgs.running_per_group) can use at the whole context length: each in whole pages, with the slots MTP's
    steps write past its last token (2S - 1, Scheduler.check_fits). A --max-total-tokens whose cache is larger
    than the memory free after the weights (free_bytes) is a SettingError naming both sizes (the allocation
    failed, after the weights had loaded). The budget leaves room for the reserved page (pool_pages)."""
    if args.max_total_tokens is not None:
        need = pool_pages(args.max_total_tokens, args.page_size) * args.page_size * bytes_per_token
        if need > free_bytes:
            raise SettingError(f"--max-total-tokens {args.max_total_tokens} needs {need / 2**30:.2f} GiB of KV cache "
                               f"({bytes_per_token} bytes per token), and {max(free_bytes, 0) / 2**30:.2f} GiB is "
                               "free after the weights")
        return args.max_total_tokens
    tokens = max(budget_bytes // bytes_per_token - args.page_size, 0)
    lookahead = 2 * args.spec_steps - 1 if args.spec_steps else 0
    per_request = -(-(context_length + lookahead) // args.page_size) * args.page_size
    return min(tokens, args.running_per_group * per_request)


def shards_here(args: ServerArgs) -> Checkpoint | None:
    """The checkpoint's shard headers where its weights are in the folder and will load (else None: config.json
    alone says which weights are FP8, loader.weight_formats)."""
    folder = Path(args.model_path) if args.model_path else None
    if args.load_format != "dummy" and folder is not None and any(folder.glob("*.safetensors")):
        return Checkpoint(folder)
    return None


def plan(cfg: ModelConfig, args: ServerArgs, device_bytes: int, rank: int = 0) -> MemoryPlan:
    """One rank of the deployment `args` on a device of `device_bytes`, from config.json (and the shards'
    headers where the weights are there: loader.weight_formats)."""
    from dsaserve.engine.model_runner import resolve_dtype
    from dsaserve.model.loader import meta_model, weight_formats
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))  # the GPU's compute dtype
    par = Parallel.without_groups(ParallelConfig(args.tp, args.dp, rank, args.ep))
    model = meta_model(cfg, par, dtype, args.spec_steps > 0, weight_formats(cfg, shards_here(args)))
    weights = weight_bytes(model)
    per_token = KVPools.bytes_per_token(cfg, resolve_kv_cache_dtype(args.kv_cache_dtype, dtype),
                                        cache_layers(cfg, args.spec_steps))
    free = device_bytes - sum(weights.values())
    budget = kv_budget(args, device_bytes, free)
    context = args.context_length or cfg.context_length
    try:
        tokens = kv_pool_tokens(args, free, per_token, context, budget) if free > 0 else 0
    except SettingError as exc:  # (--max-total-tokens past the memory the weights leave: both sizes named)
        return MemoryPlan(weights, per_token, device_bytes, 0, problem=str(exc))
    pages = pool_pages(tokens, args.page_size)
    if pages - 1 < pages_to_admit(args.page_size, args.spec_steps):
        return MemoryPlan(weights, per_token, device_bytes, 0)
    usable = (pages - 1) * args.page_size
    return MemoryPlan(weights, per_token, device_bytes, usable, pages * args.page_size * per_token)


def describe(p: MemoryPlan) -> str:
    gib = 2 ** 30
    rows = [f"  {name:<16} {b / gib:9.2f} GiB" for name, b in sorted(p.weights.items(), key=lambda kv: -kv[1])]
    return "\n".join([f"weights per rank: {p.weight_bytes / gib:.2f} GiB", *rows,
                      f"KV cache: {p.kv_bytes_per_token} bytes per token; {p.kv_tokens} tokens fit "
                      f"({p.kv_pool_bytes / gib:.2f} GiB with the reserved page; {p.device_bytes / gib:.1f} GiB "
                      f"device)"])


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--gpu-memory-gb", type=float, default=141.0, help="memory of one GPU, in GB (1e9)")


def run(ns: argparse.Namespace) -> int:
    """0: it fits; 1: it does not (both sizes named); 2: a flag or the checkpoint cannot be served. Errors go to
    stderr."""
    from dsaserve.server.preflight import check_flags_for
    args = ServerArgs.from_cli(ns)
    try:
        if args.model_path is None:
            raise ValueError("dsaserve plan needs --model-path (a folder with config.json)")
        if not 0 < ns.gpu_memory_gb < math.inf:
            raise ValueError(f"--gpu-memory-gb must be a positive number of GB, got {ns.gpu_memory_gb}")
        cfg = ModelConfig.from_path(Path(args.model_path), args.model_overrides)
        check_flags_for(cfg, args, Path(args.model_path) / "config.json")
        result = plan(cfg, args, int(ns.gpu_memory_gb * 1e9))  # (CheckpointError: a split FP8 cannot take)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model_path}: --tp {args.tp} --dp {args.dp}{f' --ep {args.ep}' if args.ep > 1 else ''}"
          f"{' --enable-dp-attention' if args.enable_dp_attention else ''}, kv {args.kv_cache_dtype}")
    print(describe(result))
    if result.fits:
        return 0
    if result.problem:
        print(f"error: {result.problem}", file=sys.stderr)
    elif result.weight_bytes < result.device_bytes:
        need = pages_to_admit(args.page_size, args.spec_steps)
        need_bytes = pool_pages(need * args.page_size, args.page_size) * args.page_size * result.kv_bytes_per_token
        print(f"error: the KV pool holds fewer than the {need} pages of {args.page_size} tokens (--page-size; "
              f"{need_bytes / 1e9:.2f} GB with the reserved page) a request needs to start, beside this rank's "
              f"{result.weight_bytes / 1e9:.1f} GB of weights on a {result.device_bytes / 1e9:.1f} GB GPU; "
              f"{pool_source(args, result.device_bytes)}", file=sys.stderr)
    else:
        print(f"error: this rank's weights need {result.weight_bytes / 1e9:.1f} GB but a GPU has "
              f"{result.device_bytes / 1e9:.1f} GB (with room for no KV cache): use more GPUs (--tp)", file=sys.stderr)
    return 1
