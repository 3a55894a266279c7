"""Decode CUDA graphs: the decode forward captured per (batch bucket, key-length bucket), replayed
with each step's metadata copied in place into static buffers (invariant 2).

A decode step of B requests runs in the smallest batch bucket >= B. Rows B.. are whole dummy
requests: token 0 at position 0 with one key, on the reserved page 0, present in the query rows
and in the metadata alike (invariant 1). The key-length bucket fixes the indexer's logits width
(the smallest power of two >= the longest sequence; index_topk when every row sees <= top-k keys,
where the indexer selects all keys without logits). On CPU the same buckets and buffers run
eagerly, which is how the tests check the padding on a machine without CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan

if TYPE_CHECKING:
    from dsaserve.engine.model_runner import ModelRunner

Tensor = torch.Tensor


@dataclass
class _Bucket:
    layout: BatchLayout  # views of the static buffers below, with the bucket's shapes baked in
    input_ids: Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sizes + [max_bs]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int, capture: bool):
        self.runner, self.max_bs, self.capture = runner, max_bs, capture
        self.buckets = batch_buckets(max_bs)
        self.topk = runner.cfg.index_topk
        self.max_keys = -(-runner.cfg.context_length // runner.page_size) * runner.page_size
        self.graphs: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, plan: StepPlan) -> bool:
        return plan.mode is StepMode.DECODE and 0 < len(plan.rids) <= self.max_bs

    def key_bucket(self, max_kv_len: int) -> int:
        if max_kv_len <= self.topk:
            return self.topk
        keys = 1 << (max_kv_len - 1).bit_length()
        return min(-(-keys // self.runner.page_size) * self.runner.page_size, self.max_keys)

    def forward(self, plan: StepPlan, layout: BatchLayout) -> Tensor:
        B = len(plan.rids)
        key = (next(b for b in self.buckets if b >= B), self.key_bucket(layout.max_kv_len))
        bucket = self.graphs.get(key) or self._make(*key)
        self._fill(bucket, plan, layout)
        if bucket.graph is not None:
            bucket.graph.replay()
            return bucket.logits[:B]
        return self._run(bucket)[:B]

    def _make(self, batch: int, keys: int) -> _Bucket:
        dev, ps = self.runner.device, self.runner.page_size
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=dev)  # noqa: E731
        ones, rows = torch.ones(batch, dtype=torch.int32, device=dev), torch.arange(batch, dtype=torch.int32,
                                                                                    device=dev)
        row_pos, row_kv_len = zeros(batch), torch.ones(batch, 1, dtype=torch.int32, device=dev)
        layout = BatchLayout(mode=StepMode.DECODE, page_size=ps, prefix_lens=row_pos, q_lens=ones,
                             seq_lens=row_kv_len[:, 0], row_req=rows, row_pos=row_pos, row_kv_len=row_kv_len,
                             out_slots=zeros(batch), page_table=zeros(batch, -(-keys // ps)), logit_rows=rows,
                             num_tokens=batch, max_kv_len=keys)
        bucket = _Bucket(layout, torch.zeros(batch, dtype=torch.long, device=dev))
        self._run(bucket)  # warm-up: Triton compiles and lazy buffers exist before capture
        if self.capture:
            torch.cuda.synchronize(dev)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=self.pool):
                bucket.logits = self._run(bucket)
        self.graphs[(batch, keys)] = bucket
        return bucket

    def _run(self, bucket: _Bucket) -> Tensor:
        hidden = self.runner.model(bucket.input_ids, bucket.layout, self.runner.pools, self.runner.ops)
        return self.runner.model.logits(hidden)

    @staticmethod
    def _fill(bucket: _Bucket, plan: StepPlan, layout: BatchLayout) -> None:
        """This step's metadata into the static buffers, in place; the tail rows become dummies."""
        B, P = len(plan.rids), layout.page_table.shape[1]
        s = bucket.layout
        bucket.input_ids[:B].copy_(torch.tensor(plan.input_ids, dtype=torch.long), non_blocking=True)
        bucket.input_ids[B:].zero_()
        s.row_pos[:B].copy_(layout.row_pos)
        s.row_pos[B:].zero_()
        s.row_kv_len[:B].copy_(layout.row_kv_len)
        s.row_kv_len[B:].fill_(1)
        s.out_slots[:B].copy_(layout.out_slots)
        s.out_slots[B:].zero_()  # slot 0 of the reserved page
        s.page_table.zero_()
        s.page_table[:B, :P].copy_(layout.page_table)
