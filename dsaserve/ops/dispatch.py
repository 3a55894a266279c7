"""DSAOps: the op wrappers the model calls. Kernel constraints (head multiples, memory budgets) and
checked-mode validation live here, so callers never know about them (invariants 4 and 8)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from dsaserve.cache.kv_format import check_cache
from dsaserve.engine.layout import BatchLayout, LayoutError, StepMode, checks_enabled
from dsaserve.ops import reference
from dsaserve.ops.fp8 import BlockFP8, QuantizedRows

Tensor = torch.Tensor


def _backend(name: str) -> ModuleType:
    if name == "torch":
        return reference
    if name == "triton":
        from dsaserve.ops import triton as triton_ops  # imported lazily: needs CUDA + triton
        return triton_ops
    if name == "flashmla":
        from dsaserve.ops import flashmla  # FlashMLA's sparse MLA, Triton's other ops
        return flashmla
    raise ValueError(f"unknown backend {name!r} (expected torch, triton or flashmla)")


def _check_cache(name: str, cache: Tensor, n: int, rope: int) -> None:
    problem = check_cache(name, cache, n, rope)
    if problem:
        raise LayoutError(problem)


def _check_slots_within_lengths(indices: Tensor, row_kv_len: Tensor) -> None:
    """The kernels read a row's first row_kv_len indices only: every slot past them must be -1."""
    past = torch.arange(indices.shape[1], device=indices.device)[None, :] >= row_kv_len.reshape(-1, 1).long()
    if bool((indices[past] >= 0).any()):
        row = int(((indices >= 0) & past).any(dim=1).nonzero()[0])
        raise LayoutError(f"top-k row {row} selects a slot past its {int(row_kv_len.reshape(-1)[row])} keys")


@dataclass(frozen=True)
class DSAOps:
    attention_backend: str = "torch"
    moe_backend: str = "torch"
    max_logits_bytes: int = 512 << 20
    # Transient bytes one MoE call may take (its pairs' rows: fp32 gate/up, the outputs before the sum); more
    # tokens run in chunks. A DP-attention prefill gathers every group's share of --chunked-prefill-size: at whole
    # expert width (--ep) the gate/up rows of 65,536 tokens alone would be 8.6 GB for V3.2.
    max_moe_bytes: int = 2 << 30
    head_multiple: int | None = None  # overrides the attention kernel's own requirement (tests)
    max_query_rows: int | None = None  # overrides the attention kernel's rows per call (tests)
    # A second CUDA stream on which a layer's indexer runs beside its query path (model/dsa.py MLAttention);
    # None: every op on the caller's stream.
    side_stream: torch.cuda.Stream | None = None
    # Deterministic inference: each row's values are computed alike whatever the other rows (ops/invariant.py), the
    # indexer's ties go to the earlier position and its selection is handed over in position order. The torch
    # backends only: the Triton kernels choose tiles and splits by the batch's size.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.batch_invariant and (self.attention_backend, self.moe_backend) != ("torch", "torch"):
            raise ValueError(f"batch-invariant ops need the torch backends, not attention {self.attention_backend!r}"
                             f" and MoE {self.moe_backend!r}")

    @property
    def _mode(self) -> dict[str, bool]:
        """The keyword that puts a reference op in batch-invariant mode (__post_init__: the torch backends)."""
        return {"batch_invariant": True} if self.batch_invariant else {}

    @property
    def checks(self) -> bool:
        """Checked mode, except while a CUDA graph is being captured (the checks read values back)."""
        return checks_enabled() and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def sparse_mla(self, q: Tensor, kv_cache: Tensor, indices: Tensor, sm_scale: float, v_dim: int,
                   layout: BatchLayout | None = None, rows: slice | None = None) -> Tensor:
        """[T, H, D] queries over their own selected slots -> [T, H, v_dim]. kv_cache: [S, D] rows, or the
        uint8 FP8 rows of cache/kv_format.py. rows: the layout's rows that q and indices hold (a slice that may
        stride; the caller ran check_sparse_mla over every row), or None for all of them."""
        if rows is None:
            self.check_sparse_mla(q, kv_cache, indices, v_dim, layout)
        lengths = None if layout is None else layout.row_kv_len if rows is None else layout.row_kv_len[rows]
        # A row's selected slots come first and number at most its keys: the kernels stop there.
        return self.sparse_mla_rows(q, kv_cache, indices, sm_scale, v_dim,
                                    None if lengths is None else lengths.contiguous())

    def check_sparse_mla(self, q: Tensor, kv_cache: Tensor, indices: Tensor, v_dim: int,
                         layout: BatchLayout | None) -> None:
        """Checked mode: sparse_mla's inputs over the layout's rows (a caller that splits the rows over ranks runs
        it on every row before its exchange, so that every rank of the group raises alike)."""
        if not self.checks:
            return
        if layout is not None:
            layout.check_rows("query", q)
            layout.check_rows("top-k indices", indices)
        if indices.shape[0] != q.shape[0]:
            raise LayoutError(f"top-k indices have {indices.shape[0]} rows, query has {q.shape[0]}")
        _check_cache("latent cache", kv_cache, v_dim, q.shape[2] - v_dim)
        if indices.numel() and int(indices.max()) >= kv_cache.shape[0]:
            raise LayoutError(f"top-k slot {int(indices.max())} >= cache slots {kv_cache.shape[0]}")
        if layout is not None:
            _check_slots_within_lengths(indices, layout.row_kv_len)

    def sparse_mla_rows(self, q: Tensor, kv_cache: Tensor, indices: Tensor, sm_scale: float, v_dim: int,
                        lengths: Tensor | None) -> Tensor:
        """sparse_mla without checks; `lengths` [T, 1]: each row reads its first lengths[t] indices at most."""
        backend = _backend(self.attention_backend)
        T, heads = q.shape[:2]
        multiple = self.head_multiple or getattr(backend, "HEAD_MULTIPLE", 1)
        padded = -heads % multiple
        if padded:  # the kernel needs heads in multiples of `multiple`: pad with zeros, trim after
            q = F.pad(q, (0, 0, 0, padded))
        limit = self.max_query_rows or getattr(backend, "max_query_rows", lambda cache: None)(kv_cache)
        if limit is None or T <= limit:
            out, _ = backend.sparse_mla(q, kv_cache, indices, sm_scale, v_dim, lengths, **self._mode)
            return out[:, :heads] if padded else out
        out = q.new_empty(T, heads, v_dim)  # the kernel takes at most `limit` rows per call: in pieces
        for start in range(0, T, limit):
            rows = slice(start, start + limit)
            part, _ = backend.sparse_mla(q[rows], kv_cache, indices[rows], sm_scale, v_dim,
                                         None if lengths is None else lengths[rows], **self._mode)
            out[rows] = part[:, :heads]
        return out

    def indexer_topk(self, q: Tensor, weights: Tensor, k_cache: Tensor, layout: BatchLayout, topk: int,
                     rows: slice | None = None) -> Tensor:
        """Top-k slot ids [T, topk] per query row (of the layout's `rows` only when given, a slice that may
        stride: q and weights then hold those rows); logits are made in row chunks under the memory budget."""
        backend = _backend(self.attention_backend)
        row_kv_len, row_req = layout.row_kv_len, layout.row_req
        if rows is not None:  # fresh tensors: aligned as the kernels were compiled for
            row_kv_len, row_req = row_kv_len[rows].contiguous(), row_req[rows].contiguous()
        T = row_req.shape[0]
        if self.checks:
            if rows is None:
                layout.check_rows("indexer query", q)
                layout.check_rows("indexer weights", weights)
            elif not q.shape[0] == weights.shape[0] == T:
                raise LayoutError(f"indexer rows {rows} of {layout.num_tokens} ({T}): query {tuple(q.shape)}, "
                                  f"weights {tuple(weights.shape)}")
            _check_cache("index-key cache", k_cache, q.shape[2], 0)
        if T == 0:
            return torch.empty(T, topk, dtype=torch.int32, device=q.device)
        if layout.key_width <= topk:  # every row sees <= topk keys: select them all, skip the logits
            slots = self.all_slots(layout, topk)
            return slots if rows is None else slots[rows]
        # Whole multiples of 16 rows: every chunk's row slices start 16-byte aligned, as the warm-up's did
        # (Triton specializes kernels on pointer alignment: an odd chunk start compiled new variants).
        rows_per_chunk = max(16, self.max_logits_bytes // (layout.key_width * 4) // 16 * 16)
        # A verify step's requests have S + 1 rows each: the kernel reads a request's keys once for all of them.
        group = T // layout.batch_size if layout.mode is StepMode.VERIFY and rows is None else 1
        parts = []
        for start in range(0, T, rows_per_chunk):
            part = slice(start, min(start + rows_per_chunk, T))
            kv_len, req = row_kv_len[part], row_req[part]
            # A prefill chunk's rows are scored only as wide as they see (its first rows see few keys): half the
            # logits and the selection's work on a long prompt. Strided rows (a slice of the layout's) take it all.
            whole = rows is not None or rows_per_chunk >= T  # one chunk (every decode step): the layout's width
            num_keys = layout.key_width if whole else layout.keys_of_rows(part.start, part.stop)
            if num_keys <= topk:
                parts.append(reference.first_positions_slots(kv_len, layout.page_table, req, layout.page_size, topk))
                continue
            logits = backend.indexer_logits(q[part], weights[part], k_cache, layout.page_table, req, kv_len,
                                            layout.page_size, num_keys, group, **self._mode)
            parts.append(backend.topk_slots(logits, kv_len, layout.page_table, req, layout.page_size, topk,
                                            **self._mode))
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one chunk (every decode step): no copy

    def all_slots(self, layout: BatchLayout, topk: int, rows: slice | None = None) -> Tensor:
        """The selection when every row sees at most `topk` keys: all of them, first to last, then -1; of the
        layout's `rows` (a slice that may stride) or of every row."""
        lengths, reqs = (layout.row_kv_len, layout.row_req) if rows is None else (layout.row_kv_len[rows],
                                                                                 layout.row_req[rows])
        return reference.first_positions_slots(lengths, layout.page_table, reqs, layout.page_size, topk)

    def moe(self, x: Tensor, w13: Tensor | BlockFP8, w2: Tensor | BlockFP8, topk_ids: Tensor, topk_weights: Tensor,
            num_tokens: int, xq: QuantizedRows | None = None, local_share: float = 1.0) -> Tensor:
        """Routed experts; block-FP8 weights run the FP8 kernel (triton) or its emulation (torch). xq: x's rows
        quantized by the norm that wrote them (fp8.QuantizedRows), or None. local_share: the share of the pairs
        expected to be these experts' (expert parallelism; the others carry id -1): the kernels' tiles follow it.
        Tokens run in chunks of at most max_moe_bytes of transient rows (each token's rows are its own)."""
        experts = _backend(self.moe_backend).moe_experts
        per_token = topk_ids.shape[1] * (x.shape[1] * x.element_size() + w13.shape[1] * 4)
        chunk = max(1, self.max_moe_bytes // per_token)
        if num_tokens <= chunk:
            return experts(x, w13, w2, topk_ids, topk_weights, num_tokens, xq, local_share, **self._mode)
        out = torch.zeros_like(x)  # (rows past num_tokens, DP padding, are 0 as in one call)
        for start in range(0, num_tokens, chunk):  # prefill-sized: xq (decode rows only) is not handed over
            end = min(start + chunk, num_tokens)
            out[start:end] = experts(x[start:end], w13, w2, topk_ids[start:end], topk_weights[start:end],
                                     end - start, None, local_share, **self._mode)
        return out
