"""CUDA graphs over static layouts, for every step mode that has a fixed shape: decode, verify, the
MTP pass over verify rows, and chained draft steps.

A graphed step is an ordinary plan padded with dummy requests to a batch bucket (StepPlan.padded),
built into a BatchLayout by the one builder with a bucketed `key_width`. The graph for that shape
copies EVERY tensor field of the layout (the layout's one packed buffer, or field by field: no field
can go stale, invariant 2), and every input tensor, into its static buffers and replays. Graphs are keyed by the
function and the layout's non-tensor fields and tensor shapes (BatchLayout.static_key), so a replay
never sees a layout of another shape. Outputs are copied into buffers shared by every graph of the
same output shape, so captured graphs do not each keep their own logits alive.

On CPU nothing is captured: the same static buffers are filled and the function runs eagerly on
them, which is how the CPU tests cover the padding and the in-place copies that graphs replay.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from dsaserve.engine.layout import BatchLayout

Tensor = torch.Tensor
GraphFn = Callable[[dict[str, Tensor], BatchLayout], tuple[Tensor, ...]]
log = logging.getLogger(__name__)


def batch_buckets(max_bs: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """The batch sizes graphs are captured for: `sizes` up to max_bs (--cuda-graph-bs), by default
    1, 2, 4, 8 and multiples of 16; max_bs is always one."""
    if sizes is None:
        sizes = tuple(b for b in (1, 2, 4, 8) if b < max_bs) + tuple(range(16, max_bs, 16))
    return sorted({b for b in sizes if b < max_bs} | {max_bs})


@dataclass
class _Graph:
    layout: BatchLayout  # static copies of one layout's tensors
    inputs: dict[str, Tensor]
    outputs: tuple[Tensor, ...] = ()
    graph: torch.cuda.CUDAGraph | None = None

    def fill(self, inputs: dict[str, Tensor], layout: BatchLayout) -> None:
        self.layout.copy_from(layout)
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)


@dataclass
class GraphStats:
    captured: int = 0
    eager_misses: int = 0  # steps that had to run eagerly because their shape was never captured


class GraphRunner:
    def __init__(self, device: torch.device, buckets: list[int], page_size: int, topk: int, most_keys: int,
                 capture: bool):
        """most_keys: the most keys a graphed step's row may see (the context length; with MTP verify rows and
        chained drafts reach past a request's last token, up to 2S more)."""
        self.device, self.max_bs, self.page_size, self.topk = device, max(buckets), page_size, topk
        self.capture = capture and device.type == "cuda"
        self.buckets = buckets
        self.max_keys = -(-most_keys // page_size) * page_size
        self.graphs: dict[tuple, _Graph] = {}
        self._shared_out: dict[tuple, Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # Each graph's warm-up call and its capture run on this stream: kernels' per-stream scratch
        # (ops/triton/_common.stream_scratch) is made and zeroed by the warm-up, never inside a capture. The
        # graphs replay on the caller's stream with this stream's scratch: nothing else runs on this stream.
        self.stream = torch.cuda.Stream(device) if self.capture else None
        self.stats = GraphStats()
        self.frozen = False  # after start-up capture under DP attention: a miss must not capture

    def batch_bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def key_width(self, max_seq_len: int) -> int:
        """The indexer's logits width for rows that see up to max_seq_len keys: top-k when every row
        sees at most top-k keys (selection takes them all), else the next power of two, in pages."""
        if max_seq_len <= self.topk:
            return self.topk
        keys = 1 << (max_seq_len - 1).bit_length()
        return min(-(-keys // self.page_size) * self.page_size, self.max_keys)

    def key_widths(self) -> list[int]:
        widths, keys = [self.topk], self.topk
        while keys < self.max_keys:
            keys = self.key_width(keys + 1)
            widths.append(keys)
        return widths

    def shapes(self) -> set[tuple[str, int, int, int]]:
        """(function, batch bucket, rows per request, key width) of every graph made so far."""
        return {(key[0], g.layout.batch_size, g.layout.num_tokens // g.layout.batch_size, g.layout.key_width)
                for key, g in self.graphs.items()}

    def run(self, name: str, fn: GraphFn, inputs: dict[str, Tensor], layout: BatchLayout) -> tuple[Tensor, ...]:
        key = (name, layout.static_key(), tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        graph = self.graphs.get(key)
        if graph is None:
            if self.frozen:
                self.stats.eager_misses += 1
                log.warning("no CUDA graph for %s (batch %d, key width %d): running eagerly", name,
                            layout.batch_size, layout.key_width)
                return fn(inputs, layout)
            graph = self._make(key, fn, inputs, layout)
        graph.fill(inputs, layout)
        if graph.graph is None:
            return fn(graph.inputs, graph.layout)
        graph.graph.replay()
        return graph.outputs

    def _make(self, key: tuple, fn: GraphFn, inputs: dict[str, Tensor], layout: BatchLayout) -> _Graph:
        static = layout.cloned()
        graph = _Graph(static, {k: v.clone() for k, v in inputs.items()})
        if self.capture:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):  # Triton compiles, lazy buffers exist before capture
                warm = fn(graph.inputs, graph.layout)
                shared = [self._shared(key[0], i, o) for i, o in enumerate(warm)]
            del warm
            torch.cuda.synchronize(self.device)
            graph.graph = torch.cuda.CUDAGraph()
            # A collection mid-capture could free another engine's graph, which is illegal while capturing:
            # none until the capture ends (garbage waits for the next collection).
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph.graph, pool=self.pool, stream=self.stream):
                    for buf, out in zip(shared, fn(graph.inputs, graph.layout)):
                        buf.copy_(out)
            finally:
                if collecting:
                    gc.enable()
            graph.outputs = tuple(shared)
            self.stats.captured += 1
        self.graphs[key] = graph
        return graph

    def _shared(self, name: str, index: int, like: Tensor) -> Tensor:
        """One output buffer per (function, output, shape): graphs of other key widths reuse it."""
        key = (name, index, tuple(like.shape), like.dtype)
        if key not in self._shared_out:
            self._shared_out[key] = torch.empty_like(like)
        return self._shared_out[key]
