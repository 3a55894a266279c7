"""ModelRunner: owns the weights and the KV pools; BatchLayout + token ids -> logits of sampling rows."""
from __future__ import annotations

import logging
import os

import torch

from dsaserve.cache.pools import KVPools
from dsaserve.engine.layout import BatchLayout, StepPlan
from dsaserve.model.loader import build_model
from dsaserve.ops.dispatch import DSAOps
from dsaserve.parallel.groups import Parallel
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)
_CPU_POOL_CAP_BYTES = 1 << 30  # on CPU the pool shares RAM with everything else: cap the default


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        raise ValueError("the triton backends need --device cuda")
    return name


class ModelRunner:
    def __init__(self, args: ServerArgs, model_path: str, progress: bool = True, par: Parallel | None = None):
        from dsaserve.parallel.launch import ranks_on_this_node
        self.par = par or Parallel()
        self.device = resolve_device(args.device, self.par.cfg.rank - ranks_on_this_node(args).start)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.model = build_model(model_path, self.device, self.dtype, self.par, progress=progress)
        self.cfg = self.model.cfg
        self.page_size = args.page_size
        self.ops = DSAOps(attention_backend=resolve_backend(args.attention_backend, self.device),
                          moe_backend=resolve_backend(args.moe_backend, self.device),
                          max_logits_bytes=args.indexer_max_logits_mb << 20)
        self.num_pages = self._pool_pages(args)
        self.pools = KVPools(self.cfg, self.num_pages, args.page_size, self.dtype, self.device)
        self.graphs = None
        capturable = self.ops.attention_backend == self.ops.moe_backend == "triton"  # torch ops read back values
        max_bs = args.cuda_graph_max_bs
        if max_bs is None:  # default: on where graphs can replay (CUDA, Triton ops, no DP attention)
            max_bs = 64 if self.device.type == "cuda" and capturable and args.dp == 1 else 0
        if max_bs and self.device.type == "cuda" and not capturable:
            raise ValueError("--cuda-graph-max-bs needs --attention-backend triton and --moe-backend triton on cuda")
        if max_bs:
            from dsaserve.engine.cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(self, min(max_bs, args.max_running_requests), capture=self.device.type == "cuda")
        log.info("KV pool: %d pages x %d tokens (%.1f MiB) on %s, %s", self.num_pages, args.page_size,
                 self.num_pages * args.page_size * KVPools.bytes_per_token(self.cfg, self.dtype) / 2**20,
                 self.device, self.dtype)

    def _pool_pages(self, args: ServerArgs) -> int:
        if args.max_total_tokens is not None:
            tokens = args.max_total_tokens
        else:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * args.mem_fraction)
            else:
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                budget = min(int(avail * args.mem_fraction), _CPU_POOL_CAP_BYTES)
            tokens = budget // KVPools.bytes_per_token(self.cfg, self.dtype)
            context = args.context_length or self.cfg.context_length
            tokens = min(tokens, args.max_running_requests * context)
        pages = tokens // args.page_size + 1  # + the reserved page 0
        # Every rank must hold every page id its leader hands out: take the smallest pool of all ranks.
        pages = min(row[0] for row in self.par.exchange([pages]))
        if pages < 2:
            raise ValueError(f"the KV pool holds {tokens} tokens: less than one page of {args.page_size}")
        return pages

    @torch.inference_mode()
    def forward(self, plan: StepPlan, layout: BatchLayout, dp_sizes: list[int] | None = None) -> torch.Tensor:
        """Logits [S, vocab] fp32 for the layout's sampling rows."""
        if self.graphs is not None and self.graphs.fits(plan):
            return self.graphs.forward(plan, layout)
        input_ids = torch.tensor(plan.input_ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, layout, self.pools, self.ops, dp_sizes)
        return self.model.logits(hidden[layout.logit_rows.long()])

    def layout(self, plan: StepPlan) -> BatchLayout:
        layout = BatchLayout.build(plan, self.page_size, self.device)
        if self.ops.checks:
            layout.validate(num_slots=self.pools.num_slots)
        return layout
