"""Linear and routed-expert modules that own their weight format: the compute dtype, or block FP8.

Modules are built in the compute-dtype format; the loader switches a module to FP8 (`to_fp8`, on
the meta device, before any memory is allocated) when its checkpoint tensor is e4m3 with
`weight_scale_inv` blocks. After loading, `prepare` fixes once how an FP8 module computes:

* kernels (CUDA with Triton): the block-scaled FP8 GEMM / fused MoE read the e4m3 weights, with
  activations quantized per token and 128-channel group;
* dequantized (CPU, or no Triton): the weight dequantized once into the compute dtype, so that CPU
  runs compute exactly what the transformers oracle computes on a dequantized checkpoint.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dsaserve.config import ModelConfig
from dsaserve.parallel.groups import ParallelConfig
from dsaserve.ops import fp8, invariant
from dsaserve.ops.dispatch import DSAOps
from dsaserve.ops.fp8 import FP8, BlockFP8, QuantizedRows

Tensor = torch.Tensor
Gemm = Callable[..., Tensor]  # (x, weight, xq=QuantizedRows | None) -> x W^T
Mode = Literal["kernels", "emulate", "dequantized"]
log = logging.getLogger(__name__)

# Weights the model reads as matrices rather than calling the module (absorbed MLA, fp32 indexer
# weights, logits): they stay in the compute dtype, dequantized at load if the checkpoint has FP8.
DEQUANTIZED_AT_LOAD = ("kv_b_proj", "weights_proj", "lm_head", "shared_head.head")


class Linear(nn.Module):
    """y = x W^T (no bias). W [out, in] is in the compute dtype, or e4m3 plus `weight_scale_inv`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.block: tuple[int, int] | None = None
        self.gemm: Gemm | None = None  # set by prepare(): the FP8 GEMM, or None for the dequantized weight
        self._gemm_weight: BlockFP8 | None = None  # made once by prepare(), not per forward
        self._dequantized: Tensor | None = None
        self.quantized_rows = 0  # set by prepare(): up to how many rows forward() uses x quantized by its producer
        self.batch_invariant = False  # set by quant.prepare(): each row's product by ops.invariant (deterministic mode)
        # A fused module (concat_rows): (checkpoint name relative to the owner, first row, rows) per part.
        self.sources: tuple[tuple[str, int, int], ...] = ()

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Switch to block FP8 (call on the meta device, before loading)."""
        rows, cols = math.ceil(self.out_features / block[0]), math.ceil(self.in_features / block[1])
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(rows, cols), requires_grad=False)
        self.block = block

    @property
    def fp8(self) -> BlockFP8:
        assert self.block is not None, "not an FP8 module"
        return BlockFP8(self.weight, self.weight_scale_inv, self.block)

    def prepare(self, gemm: Gemm | None, dtype: torch.dtype, quantized_rows: int = 0) -> None:
        self.gemm = gemm
        self._gemm_weight = self.fp8 if gemm is not None else None
        self._dequantized = self.fp8.dequantize(dtype) if gemm is None else None
        self.quantized_rows = quantized_rows

    def input_group(self, rows: int) -> int:
        """The group in which this module's FP8 GEMM would quantize `rows` input rows when their producer can
        hand them over quantized (forward's xq); 0 when it would not use them."""
        return _input_group(self.block, rows, self.quantized_rows)

    def forward(self, x: Tensor, xq: QuantizedRows | None = None) -> Tensor:
        """xq: x's rows quantized by their producer (asked for through input_group), else None."""
        if self.block is None:
            return self._product(x, self.weight)
        if self.gemm is not None:
            assert self._gemm_weight is not None
            if _takes(xq, x, self.input_group):
                return self.gemm(x, self._gemm_weight, xq=xq)
            return self.gemm(x, self._gemm_weight)
        assert self._dequantized is not None, "FP8 Linear used before prepare()"
        return self._product(x, self._dequantized)

    def _product(self, x: Tensor, weight: Tensor) -> Tensor:
        """x W^T with a weight in the compute dtype: row by row in deterministic mode (ops/invariant.py)."""
        return invariant.linear(x, weight) if self.batch_invariant else F.linear(x, weight)

    def extra_repr(self) -> str:
        fmt = f"fp8 blocks {self.block}" if self.block else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"


def _input_group(block: tuple[int, int] | None, rows: int, quantized_rows: int) -> int:
    return block[1] if block is not None and 0 < rows <= quantized_rows else 0


def _takes(xq: QuantizedRows | None, x: Tensor, input_group: Callable[[int], int]) -> bool:
    """Whether a module whose input_group is given reads xq for x: asked for at x's row count, and xq is x's
    (shapes checked on the host, so a producer's rows handed to the wrong input fail loudly, not silently)."""
    if xq is None:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    group = input_group(rows)
    if group:
        xq.check("quantized input rows", rows, x.shape[-1], group)
    return group > 0


def concat_rows(parts: list[tuple[str, Linear]]) -> Linear | None:
    """One Linear computing the outputs of every (name, part) side by side, their weights stacked by rows,
    for parts that read the same input: one GEMM launch instead of len(parts), and in FP8 one activation
    quantization. Made on the meta device, after formats are chosen and before loading: the loader fills
    each part's rows from its own checkpoint tensor (`sources`). None when the formats differ, or an FP8
    part before the last ends inside a scale block (its blocks would straddle two weights)."""
    first = parts[0][1]
    if any(p.block != first.block or p.weight.dtype != first.weight.dtype or p.in_features != first.in_features
           for _, p in parts):
        return None
    if first.block is not None and any(p.out_features % first.block[0] for _, p in parts[:-1]):
        return None
    fused = Linear(first.in_features, sum(p.out_features for _, p in parts))
    # torch.empty, not empty_like: on the meta device empty_like imports sympy (0.7 s per process)
    fused.weight = nn.Parameter(torch.empty(fused.weight.shape, dtype=first.weight.dtype), requires_grad=False)
    if first.block is not None:
        fused.to_fp8(first.block)
    starts = [sum(p.out_features for _, p in parts[:i]) for i in range(len(parts))]
    fused.sources = tuple((name, start, p.out_features) for (name, p), start in zip(parts, starts))
    return fused


class Experts(nn.Module):
    """Routed experts stacked over E: w13 [E, 2I', H] (gate rows at 0, up rows at I'), w2 [E, H, I'].

    I' = I in the compute dtype. In FP8 I' is I rounded up to whole scale blocks, so that gate and
    up each start a block (zero rows fill the gap; their outputs are silu(0) * 0 = 0): real
    checkpoints split experts on block boundaries and have I' = I. A shared expert of the same width
    may follow as expert E (`shared_slot`, add_shared_slot): the router then gives every row that one too.

    Expert parallelism (--ep): E is this rank's share of the routed experts, those from `first_expert` on (the
    router numbers them from there: ops.fused.route's `local`), each split over the tp / ep ranks that hold it.
    """

    def __init__(self, cfg: ModelConfig, par: ParallelConfig):
        super().__init__()
        self.num_experts, self.hidden = cfg.n_routed_experts // par.ep, cfg.hidden_size
        self.first_expert = par.ep_rank * self.num_experts
        self.local_share = 1 / par.ep  # of the router's pairs, expected on these experts
        self.inter = cfg.moe_intermediate_size // par.moe_tp
        self.slots = self.num_experts  # stacked experts: the routed ones, then the shared one if added
        self.padded_inter = self.inter
        self.block: tuple[int, int] | None = None
        self._allocate(torch.get_default_dtype())
        self.kernels = False  # set by prepare(): e4m3 weights to the MoE op, or the dequantized copy
        self._dequantized: tuple[Tensor, Tensor] | None = None
        self.quantized_rows = 0  # as Linear.quantized_rows

    def _allocate(self, dtype: torch.dtype) -> None:
        """(Re)make the parameters for `slots` experts in the current format (on the meta device)."""
        E, H, Ip, block = self.slots, self.hidden, self.padded_inter, self.block
        if block is None:
            self.w13 = nn.Parameter(torch.empty(E, 2 * Ip, H, dtype=dtype), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(E, H, Ip, dtype=dtype), requires_grad=False)
            return
        self.w13 = nn.Parameter(torch.empty(E, 2 * Ip, H, dtype=FP8), requires_grad=False)
        self.w13_scale_inv = nn.Parameter(torch.empty(E, 2 * Ip // block[0], math.ceil(H / block[1])),
                                          requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, Ip, dtype=FP8), requires_grad=False)
        self.w2_scale_inv = nn.Parameter(torch.empty(E, math.ceil(H / block[0]), Ip // block[1]), requires_grad=False)

    def to_fp8(self, block: tuple[int, int]) -> None:
        self.padded_inter = -(-self.inter // math.lcm(*block)) * math.lcm(*block)
        self.block = block
        self._allocate(FP8)

    @property
    def shared_slot(self) -> int | None:
        """The shared expert's index (after the routed experts), None when it runs as a dense MLP."""
        return self.num_experts if self.slots > self.num_experts else None

    def can_stack(self, shared_gate: Linear, expert_parallel: bool) -> bool:
        """Whether a shared expert whose gate_proj is `shared_gate` can join as one more expert: same width
        on this rank, same format, and every rank runs it (not under expert parallelism, where it is split over
        all ranks as a dense MLP while the routed experts are divided among them)."""
        return (not expert_parallel and shared_gate.out_features == self.inter and shared_gate.block == self.block
                and shared_gate.weight.dtype == self.w13.dtype)

    def local_index(self, expert: int) -> int | None:
        """A checkpoint's routed expert number -> its index among this rank's experts, None if another rank's."""
        index = expert - self.first_expert
        return index if 0 <= index < self.num_experts else None

    def add_shared_slot(self) -> None:
        """One more stacked expert, the shared one (call on the meta device, before loading)."""
        assert self.shared_slot is None, "the shared expert is stacked already"
        self.slots += 1
        self._allocate(self.w13.dtype)

    @property
    def padded(self) -> bool:
        return self.padded_inter != self.inter

    def slot(self, proj: str, expert: int) -> tuple[Tensor, Tensor | None]:
        """Where checkpoint tensor `experts.{expert}.{proj}.weight` (or the shared expert's, at shared_slot)
        goes: this rank's weight rows (and their scale blocks in FP8)."""
        I, Ip = self.inter, self.padded_inter
        if proj == "down_proj":
            weight = self.w2.data[expert, :, :I]
            if self.block is None:
                return weight, None
            return weight, self.w2_scale_inv.data[expert, :, :math.ceil(I / self.block[1])]
        start = 0 if proj == "gate_proj" else Ip
        weight = self.w13.data[expert, start:start + I]
        if self.block is None:
            return weight, None
        first = start // self.block[0]
        return weight, self.w13_scale_inv.data[expert, first:first + math.ceil(I / self.block[0])]

    def zero_padding(self) -> None:
        """Padded FP8 experts: zero everything before loading, so the gap rows hold 0 (not garbage)."""
        if self.padded:
            for p in (self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv):
                (p.data.view(torch.uint8) if p.dtype == FP8 else p.data).zero_()

    def prepare(self, kernels: bool, dtype: torch.dtype, quantized_rows: int = 0) -> None:
        self.kernels = kernels
        self._dequantized = None if kernels else tuple(w.dequantize(dtype) for w in self.fp8)  # type: ignore
        self.quantized_rows = quantized_rows

    def input_group(self, rows: int) -> int:
        """As Linear.input_group: the FP8 MoE's activation group for `rows` tokens handed over quantized, or 0."""
        return _input_group(self.block, rows, self.quantized_rows)

    @property
    def fp8(self) -> tuple[BlockFP8, BlockFP8]:
        """(w13, w2) with their block scales."""
        assert self.block is not None, "not FP8 experts"
        return BlockFP8(self.w13, self.w13_scale_inv, self.block), BlockFP8(self.w2, self.w2_scale_inv, self.block)

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, ops: DSAOps,
                xq: QuantizedRows | None = None) -> Tensor:
        if not _takes(xq, x, self.input_group):
            xq = None
        if self.block is None:
            w13, w2 = self.w13, self.w2
        elif self.kernels:
            w13, w2 = self.fp8
        else:
            assert self._dequantized is not None, "FP8 Experts used before prepare()"
            w13, w2 = self._dequantized
        return ops.moe(x, w13, w2, topk_ids, topk_weights, x.shape[0], xq, self.local_share)


def fp8_kernels_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _emulated_gemm(x: Tensor, w: BlockFP8, xq: QuantizedRows | None = None) -> Tensor:
    return fp8.linear(x, w).to(x.dtype)  # quantizes x itself: xq holds the same values


def prepare(model: nn.Module, mode: Mode, dtype: torch.dtype, checks: bool = False,
            batch_invariant: bool = False, progress: bool = False) -> None:
    """Fix how every FP8 module computes, once, after loading (and with batch_invariant every Linear in the compute
    dtype or dequantized takes each row's product by ops.invariant: deterministic inference, CPU):

    * "kernels": the Triton FP8 GEMM; experts hand their e4m3 weights to the MoE op (Triton's fused
      FP8 MoE, or the torch backend's emulation of it); up to QUANTIZED_INPUT_MAX_M rows both take their
      input quantized by the kernel that writes it (an RMSNorm, the absorbed W_UV product: input_group, xq);
    * "emulate": the kernels' function in plain PyTorch (ops/fp8.py), for tests against the kernels;
    * "dequantized": the weight dequantized once into `dtype` (CPU: the oracle's function); with `progress` a bar
      (a 4.6 GB FP8 checkpoint takes about 45 s on two cores).
    """
    if mode not in ("kernels", "emulate", "dequantized"):
        raise ValueError(f"unknown FP8 mode {mode!r}")
    modules = [m for m in model.modules() if isinstance(m, (Linear, Experts)) and m.block is not None]
    gemm: Gemm | None = None
    quantized_rows = 0
    if mode == "kernels":
        from dsaserve.ops.triton import fp8_wgmma
        from dsaserve.ops.triton.fp8_gemm import CUBLAS_MIN_M, QUANTIZED_INPUT_MAX_M, cublas_blockwise_works, fp8_linear
        gemm = partial(fp8_linear, checks=checks)
        device = next(modules[0].parameters()).device if modules else torch.device("cpu")
        if device.type == "cuda":  # probed now: never inside a CUDA graph capture
            quantized_rows = QUANTIZED_INPUT_MAX_M
            index = device.index or 0
            log.info("FP8 GEMMs of %d+ rows: %s; where it refuses and for prefill-sized experts: %s", CUBLAS_MIN_M,
                     "cuBLAS block-scaled" if cublas_blockwise_works(index) else "Triton (no cuBLAS block scaling)",
                     "the Gluon wgmma kernel" if fp8_wgmma.works(index) else "Triton (no Gluon wgmma here)")
    elif mode == "emulate":
        gemm = _emulated_gemm
    for m in model.modules():
        if isinstance(m, Linear):
            m.batch_invariant = batch_invariant
    bar = progress and mode == "dequantized"
    for m in tqdm(modules, desc="Dequantizing FP8 weights", unit="module", disable=not bar):
        if isinstance(m, Linear):
            m.prepare(gemm, dtype, quantized_rows)
        else:
            m.prepare(mode != "dequantized", dtype, quantized_rows)
    if modules and mode == "dequantized" and any(p.is_cuda for p in model.parameters()):
        log.warning("FP8 weights on CUDA without Triton: each is dequantized once to %s and kept beside it "
                    "(more memory than a checkpoint in that dtype)", dtype)


def default_mode(device: torch.device) -> Mode:
    return "kernels" if fp8_kernels_available(device) else "dequantized"


@torch.inference_mode()
def warm_up_gemms(model: nn.Module, rows: tuple[int, ...], dtype: torch.dtype) -> int:
    """Run every distinct FP8 Linear's GEMM once at each count in `rows`, with x as it is and, where the module
    takes its rows quantized by their producer (input_group), as act_quant hands them: each tile variant the
    kernel has for decode-sized rows is compiled, whichever step shape reaches it later. Prompts cannot reach
    them all: a prompt up to index_topk keys never runs the indexer's wq_b, a longer one has more rows than a
    decode-sized step, and eager decode-sized steps (MTP draft steps beside prompt chunks, verify batches past
    the graph sizes) come at any size.
    Returns the number of products run."""
    runs, seen = 0, set()
    for m in model.modules():
        if not isinstance(m, Linear) or m.gemm is None:
            continue
        key = (m.in_features, m.out_features, m.block, m.quantized_rows, m.weight.device)
        if key in seen:
            continue
        seen.add(key)
        for n in rows:
            x = torch.randn(n, m.in_features, device=m.weight.device, dtype=dtype)
            m(x)
            group = m.input_group(n)
            if group:  # contiguous rows, as the producing kernels write them (act_quant's are a padded view)
                values, scales = fp8.act_quant(x, group)
                m(x, QuantizedRows(values.contiguous(), scales, group))
            runs += 1 + bool(group)
    return runs
