"""ModelRunner: owns the weights, the KV pools and the CUDA graphs; plans become layouts (padded to a
graph bucket when the step replays a graph), layouts and token ids become hidden states and logits."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import torch

from dsaserve.cache.kv_format import FP8 as FP8_ROWS
from dsaserve.cache.pools import KVPools, resolve_kv_cache_dtype
from dsaserve.config import ModelConfig
from dsaserve.engine.cuda_graph import GraphRunner, batch_buckets
from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
from dsaserve.model.loader import build_model
from dsaserve.ops.dispatch import DSAOps
from dsaserve.parallel.groups import Parallel
from dsaserve.planner import (cache_layers, dequantized_bytes, kv_budget, kv_pool_tokens, pool_pages, pool_source,
                              weight_bytes)
from dsaserve.server_args import ServerArgs, SettingError

log = logging.getLogger(__name__)
Tensor = torch.Tensor
_CPU_POOL_CAP_BYTES = 1 << 30  # on CPU the pool shares RAM with everything else: cap the default


@dataclass(frozen=True)
class StepShape:
    """What every rank agreed on before a step (lockstep.sync)."""
    dp_sizes: tuple[int, ...]  # real query rows of every DP group
    draft_sizes: tuple[int, ...]  # requests of every DP group that draft after this step (spec)
    graph_batch: int | None  # the batch bucket every group pads to, when this step replays graphs
    mode: StepMode  # the mode of a graphed step (what an idle group's dummies run)
    rows_per_req: int  # query rows of each request in a graphed step
    any_work: bool = False
    any_stop: bool = False
    epoch: int = 0  # the lowest wake-up epoch any DP leader has seen (server.worker: idle leaders meet again)

    def for_drafts(self) -> StepShape:
        return dataclasses.replace(self, dp_sizes=self.draft_sizes, mode=StepMode.DRAFT, rows_per_req=1)


def _free_bytes(device: torch.device) -> int:
    """Memory free on the device now (CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda was asked for but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        raise SettingError("the triton backends need --device cuda")
    return name


def whole_pages(pages: int, page_size: int, slot_multiple: int) -> int:
    """The most pages, up to `pages`, whose slots number a multiple of `slot_multiple`."""
    step = slot_multiple // math.gcd(slot_multiple, page_size)
    return pages - pages % step


def flashmla_blocker(device: torch.device, cfg: ModelConfig, dtype: torch.dtype, kv_dtype: torch.dtype) -> str | None:
    """None when FlashMLA's kernels can serve this model over this cache here, else why not."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return f"it needs --device cuda and --dtype bfloat16 (got {device.type}, {dtype})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from dsaserve.ops import flashmla  # imports Triton: only where CUDA is
    return flashmla.available(device.index or 0) or flashmla.unsupported(
        cfg.latent_dim, cfg.kv_lora_rank, cfg.num_attention_heads, cfg.index_topk, kv_dtype == FP8_ROWS)


def resolve_attention_backend(name: str, device: torch.device, cfg: ModelConfig, dtype: torch.dtype,
                              kv_dtype: torch.dtype) -> str:
    """auto takes FlashMLA over an FP8 cache wherever it can run: as accurate as ours against the fp32 run,
    about even at 1K context and faster from 4K on, where every selected slot is real (docs/benchmarks.md).
    Over a bf16 cache it has only its prefill kernel, slower than ours at few rows: there flashmla is the
    flag's choice. Asked for where it cannot run, flashmla says why."""
    if name == "auto" and kv_dtype == FP8_ROWS and flashmla_blocker(device, cfg, dtype, kv_dtype) is None:
        return "flashmla"
    if name != "flashmla":
        return resolve_backend(name, device)
    why = flashmla_blocker(device, cfg, dtype, kv_dtype)
    if why is not None:
        raise SettingError(f"--attention-backend flashmla cannot run here: {why}")
    return "flashmla"


class ModelRunner:
    def __init__(self, args: ServerArgs, model_path: str, progress: bool = True, par: Parallel | None = None):
        from dsaserve.parallel.nodes import ranks_on_this_node
        self.par = par or Parallel()
        self.device = resolve_device(args.device, self.par.cfg.rank - ranks_on_this_node(args).start)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        self.spec_steps = args.spec_steps
        self.cfg = ModelConfig.from_path(model_path, args.model_overrides)
        # What config.json and the device can refuse is refused before the weights load (minutes at full size).
        if self.spec_steps and not self.cfg.num_nextn_predict_layers:
            raise SettingError(f"--speculative-algorithm {args.speculative_algorithm} needs the checkpoint's MTP "
                             f"layer, but config.json has num_nextn_predict_layers="
                             f"{self.cfg.num_nextn_predict_layers}")
        # GLM-5.2: draft steps after the first attend the first's selection (MTPDrafter.run)
        self.share_draft_topk = self.spec_steps > 1 and self.cfg.index_share_for_mtp_iteration
        attention = resolve_attention_backend(args.attention_backend, self.device, self.cfg, self.dtype, self.kv_dtype)
        moe = resolve_backend(args.moe_backend, self.device)
        deterministic = args.enable_deterministic_inference
        if deterministic and (self.device.type, self.dtype, attention, moe) != ("cpu", torch.float32, "torch", "torch"):
            raise SettingError("--enable-deterministic-inference runs on CPU in float32 with the torch backends only, "
                               f"got device {self.device.type}, dtype {str(self.dtype).removeprefix('torch.')}, "
                               f"attention {attention}, MoE {moe}: the GPU kernels choose tiles and splits by the "
                               "batch's size, and CPU matmuls in bf16 / fp16 switch libraries by it (--device cpu "
                               "--dtype float32 runs it)")
        free_before_weights = _free_bytes(self.device)  # --mem-fraction's whole (SGLang's rule)
        self.model = build_model(model_path, self.device, self.dtype, self.par, load_mtp=self.spec_steps > 0,
                                 progress=progress, load_format=args.load_format, overrides=args.model_overrides,
                                 batch_invariant=deterministic)
        self.page_size = args.page_size
        self.context_length = args.context_length or self.cfg.context_length
        self.ops = DSAOps(attention_backend=attention, moe_backend=moe,
                          max_logits_bytes=args.indexer_max_logits_mb << 20,
                          side_stream=torch.cuda.Stream(self.device) if attention in ("triton", "flashmla") else None,
                          batch_invariant=deterministic)
        self._log_sparse_mla_kernel()
        self.cache_layers = cache_layers(self.cfg, self.spec_steps)
        if self.par.cfg.rank == 0:
            parts = sorted(weight_bytes(self.model).items(), key=lambda kv: -kv[1])
            log.info("weights on this rank: %.2f GiB (%s)", sum(b for _, b in parts) / 2**30,
                     ", ".join(f"{name} {b / 2**30:.2f}" for name, b in parts))
        self.num_pages = self._pool_pages(args, free_before_weights)
        self.pools = KVPools(self.cfg, self.num_pages, args.page_size, self.kv_dtype, self.device, self.cache_layers)
        self.graphs = self._graph_runner(args)
        log.info("KV pool: %d pages x %d tokens (%.1f MiB) on %s, %s; attention %s, MoE %s%s", self.num_pages,
                 args.page_size, self.num_pages * args.page_size * self.bytes_per_token / 2**20, self.device,
                 self.kv_dtype, self.ops.attention_backend, self.ops.moe_backend,
                 "; deterministic inference (batch-invariant ops, steps on one thread)" if deterministic else "")

    @property
    def bytes_per_token(self) -> int:
        return KVPools.bytes_per_token(self.cfg, self.kv_dtype, self.cache_layers)

    @property
    def most_keys(self) -> int:
        """The most keys one row of a step may see: the context length, and with MTP up to 2S more (verify rows
        and chained drafts run past a request's last token)."""
        return self.context_length + 2 * self.spec_steps

    def _graph_runner(self, args: ServerArgs) -> GraphRunner | None:
        # torch ops read back values
        capturable = self.ops.attention_backend in ("triton", "flashmla") and self.ops.moe_backend == "triton"
        max_bs = args.cuda_graph_max_bs
        if max_bs is None and args.cuda_graph_bs:
            max_bs = max(args.cuda_graph_bs)
        if max_bs is None:  # default: on where graphs can replay (CUDA, Triton ops)
            max_bs = 64 if self.device.type == "cuda" and capturable else 0
        if max_bs and self.device.type == "cuda" and not capturable:
            raise SettingError("--cuda-graph-max-bs needs --attention-backend triton and --moe-backend triton on cuda")
        if not max_bs:
            return None
        buckets = batch_buckets(min(max_bs, args.running_per_group), args.cuda_graph_bs)
        return GraphRunner(self.device, buckets, self.page_size, self.cfg.index_topk, self.most_keys, capture=True)

    def _log_sparse_mla_kernel(self) -> None:
        """Which kernel runs sparse MLA on CUDA (attention backend triton): probed now, never inside a graph
        capture (the model's dims, head count and rows decide per call, mla._gluon)."""
        if self.ops.attention_backend != "triton" or self.device.type != "cuda":
            return
        from dsaserve.ops.triton import mla_gluon
        if not mla_gluon.works(self.device.index or 0):
            kernel = "Triton's kernel"
        elif self.cfg.num_attention_heads // self.par.cfg.attn_tp > 32:
            kernel = "the Gluon kernel (Hopper)"
        else:  # a --tp 4 / 8 rank's heads, or a prefill split by rows (the group's heads): mla._gluon
            kernel = "the Gluon kernel (Hopper) where mla._gluon takes the heads it gets, else Triton's"
        log.info("sparse MLA: %s", kernel)

    def _pool_pages(self, args: ServerArgs, free_before_weights: int) -> int:
        if self.device.type == "cuda":
            free = _free_bytes(self.device)  # the memory still free after the weights (as dsaserve plan counts)
        else:  # free RAM moves with everything else on the machine by megabytes: count the weights instead
            held = sum(weight_bytes(self.model).values()) + dequantized_bytes(self.model, self.dtype)
            free = free_before_weights - held
        budget = kv_budget(args, free_before_weights, free)
        if self.device.type == "cpu":
            budget = min(budget, _CPU_POOL_CAP_BYTES)  # the default pool is capped: RAM is shared with everything else
        tokens = kv_pool_tokens(args, free, self.bytes_per_token, self.context_length, budget)
        pages = pool_pages(tokens, args.page_size)
        whole = ""
        if self.ops.attention_backend == "flashmla":  # its FP8 kernel sees the cache as pages of 64 slots
            from dsaserve.ops.flashmla import VIEW_PAGE
            pages = whole_pages(pages, args.page_size, VIEW_PAGE)
            whole = f" (FlashMLA's kernels take the pool in whole multiples of {VIEW_PAGE} slots)"
        # Every rank must hold every page id its leader hands out: take the smallest pool of all ranks.
        smallest = min(row[0] for row in self.par.exchange([pages]))
        if smallest < 2:
            whose = "the KV pool" if pages < 2 else "another rank's KV pool"
            raise SettingError(f"{whose} has room for less than one page of {args.page_size} tokens (--page-size)"
                               f"{whole}; {pool_source(args, free_before_weights)}")
        return smallest

    # -- plans -> layouts --------------------------------------------------------------------

    def graph_batch_of(self, plan: StepPlan | None, graph_mode: StepMode) -> int:
        """This group's vote for a graphed step: its batch size, 0 when idle, -1 when it cannot be graphed."""
        if self.graphs is None:
            return -1
        if plan is None or plan.mode is StepMode.IDLE:
            return 0
        fits = plan.mode is graph_mode and len(plan.rids) <= self.graphs.max_bs
        return len(plan.rids) if fits else -1

    def prepare(self, plan: StepPlan, shape: StepShape, min_keys: int = 0) -> tuple[StepPlan, BatchLayout]:
        """The step's plan (padded with dummy requests when it replays a graph) and its layout."""
        if shape.graph_batch is None:
            return plan, self.checked(BatchLayout.build(plan, self.page_size, self.device, dp_sizes=shape.dp_sizes))
        assert self.graphs is not None
        seq = max([p + q for p, q in zip(plan.prefix_lens, plan.q_lens)] + [min_keys])
        return self._padded(plan, shape, self.graphs.key_width(seq))

    def _padded(self, plan: StepPlan, shape: StepShape, keys: int) -> tuple[StepPlan, BatchLayout]:
        """The plan padded with dummy requests to shape.graph_batch, its layout `keys` wide."""
        assert shape.graph_batch is not None
        plan = plan.padded(shape.graph_batch, shape.rows_per_req, self.page_size, shape.mode)
        rows = shape.graph_batch * shape.rows_per_req
        return plan, self.checked(BatchLayout.build(plan, self.page_size, self.device, key_width=keys,
                                                     dp_sizes=(rows,) * len(shape.dp_sizes),
                                                     page_width=-(-keys // self.page_size)))

    def checked(self, layout: BatchLayout) -> BatchLayout:
        """The layout, its invariants asserted in checked mode."""
        if self.ops.checks:
            layout.validate(num_slots=self.pools.num_slots)
        return layout

    def capture_graphs(self, dp: int, progress: bool) -> None:
        """Capture every graph the server can replay (each batch bucket x key width, for decode or verify,
        the MTP pass and draft steps) before it turns ready: requests never wait on a compile or a
        capture. Without graphs on a GPU, run the same dummy steps eagerly at batch 1 over every key-width
        tier the indexer's selection compiles for (selection_widths), which real prompts of the warm-up
        (engine/warmup.py) may not reach. First the selection's kernels alone at the row counts where its
        path changes (indexer.warm_selection). Every rank runs the same shapes in the same order (their
        collectives line up)."""
        from tqdm import tqdm
        if self.device.type != "cuda":
            return
        from dsaserve.ops.triton.indexer import selection_widths, warm_selection
        if self.ops.attention_backend in ("triton", "flashmla") and self.cfg.index_topk:
            warm_selection(self.device, self.cfg.index_topk, self.page_size, self.most_keys)
        if self.graphs is None:
            work = [(1, w) for w in selection_widths(self.cfg.index_topk, self.most_keys)]
        else:
            work = [(b, w) for b in self.graphs.buckets for w in self.graphs.key_widths()]
        graphed = self.graphs is not None
        for batch, keys in tqdm(work, desc="Capturing CUDA graphs" if graphed else "Warming the selection widths",
                                disable=not progress):
            self._dummy_step(dp, batch, keys, graphed)
        if self.graphs is not None:
            self.graphs.frozen = True
        torch.cuda.synchronize(self.device)

    def _dummy_step(self, dp: int, batch: int, keys: int, graphed: bool) -> None:
        """A decode (or verify, then the MTP pass and a draft step) of `batch` dummy requests, `keys` wide."""
        spec = self.spec_steps
        mode, rows = (StepMode.VERIFY, spec + 1) if spec else (StepMode.DECODE, 1)
        shape = StepShape((0,) * dp, (0,) * dp, batch, mode, rows)
        _, layout = self._padded(StepPlan.idle(), shape, keys)
        ids = torch.zeros(layout.num_tokens, dtype=torch.long, device=self.device)
        states, _ = self.target(ids, layout, graphed=graphed)
        if spec:
            firsts = torch.arange(batch, dtype=torch.int32, device=self.device) * rows
            first = self.draft(ids, states, layout.with_logit_rows(firsts), graphed=graphed)
            _, one = self._padded(StepPlan.idle(), shape.for_drafts(), keys)
            self.draft(ids[:batch], states[:batch], one, graphed, *first[2:])

    # -- forwards ----------------------------------------------------------------------------

    @torch.inference_mode()
    def target(self, input_ids: Tensor, layout: BatchLayout, graphed: bool = False) -> tuple[Tensor, Tensor]:
        """(hidden [T, H] of every row, fp32 logits of the layout's logit rows)."""
        return self._run("target", self._target, {"input_ids": input_ids}, layout, graphed)

    @torch.inference_mode()
    def draft(self, input_ids: Tensor, hidden: Tensor, layout: BatchLayout, graphed: bool = False,
              reused_topk: Tensor | None = None) -> tuple[Tensor, ...]:
        """The MTP layer: (its hidden states at the logit rows, fp32 logits there), and the MTP layer's selection
        at those rows when a later draft step will reuse it (share_draft_topk and no reused_topk given)."""
        inputs = {"input_ids": input_ids, "hidden": hidden}
        if reused_topk is not None:
            inputs["reused_topk"] = reused_topk
        return self._run("draft", self._draft, inputs, layout, graphed)

    def _run(self, name: str, fn, inputs: dict[str, Tensor], layout: BatchLayout,
             graphed: bool) -> tuple[Tensor, ...]:
        if graphed:
            assert self.graphs is not None
            return self.graphs.run(name, fn, inputs, layout)  # type: ignore[return-value]
        return fn(inputs, layout)

    def _target(self, inputs: dict[str, Tensor], layout: BatchLayout) -> tuple[Tensor, Tensor]:
        hidden = self.model(inputs["input_ids"], layout, self.pools, self.ops)
        return hidden, self.model.logits(hidden[layout.logit_rows.long()])

    def _draft(self, inputs: dict[str, Tensor], layout: BatchLayout) -> tuple[Tensor, ...]:
        reused = inputs.get("reused_topk")
        hidden, topk = self.model.draft(inputs["input_ids"], inputs["hidden"], layout, self.pools, self.ops, reused,
                                        keep_topk=self.share_draft_topk and reused is None)
        logit_rows = layout.logit_rows.long()
        rows = hidden[logit_rows]
        out = (rows, self.model.logits(rows))
        return out if topk is None else out + (topk[logit_rows],)
