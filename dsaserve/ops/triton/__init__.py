"""Triton GPU kernels with the signatures and semantics of dsaserve.ops.reference.

The dispatcher (dsaserve.ops.dispatch) calls these through the module; HEAD_MULTIPLE tells it to pad heads,
max_query_rows how many rows one sparse_mla call takes.
The sparse-MLA kernel masks any head count itself, so no padding is needed.
"""
from __future__ import annotations

from dsaserve.ops.triton.indexer import indexer_logits, topk_slots
from dsaserve.ops.triton.mla import max_query_rows, sparse_mla
from dsaserve.ops.triton.moe import moe_experts

HEAD_MULTIPLE = 1

__all__ = ["HEAD_MULTIPLE", "indexer_logits", "max_query_rows", "moe_experts", "sparse_mla", "topk_slots"]
