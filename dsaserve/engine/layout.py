"""StepPlan and BatchLayout: the single description of one forward step; every per-step tensor
derives from it, through one builder, for every step mode (extend, decode, verify, draft)."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
_ALIGN = 4  # int32 values: 16 bytes
IN_FLIGHT = -1  # a plan's input id for a token still being sampled on the device (overlapped scheduling)
DUMMY_RID = ""  # the request id of a dummy request (CUDA-graph padding): page 0 only, never sampled for real


class StepMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"
    VERIFY = "verify"  # the target over the last accepted token and S drafts (q_len S + 1)
    MIXED = "mixed"  # decode or verify rows of running requests and prefill chunks of others
    DRAFT = "draft"  # the MTP layer, one row per request (a chained draft step)
    IDLE = "idle"


class LayoutError(AssertionError):
    """A layout or kernel input violates an invariant: the checks of validate() and the kernel wrappers run in
    checked mode; build() and padded() refuse a plan they cannot describe always."""


def checks_enabled() -> bool:
    return os.environ.get("DSASERVE_CHECKS", "0") == "1"


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler decided, in tuples (page ids: int32 arrays): one entry per request in the step.
    Dummy requests (rid DUMMY_RID, pages all 0) may follow the real ones."""
    mode: StepMode
    rids: tuple[str, ...]
    pages: tuple[Sequence[int], ...]  # page ids of each request (int32 arrays from the scheduler), covering seq_len
    prefix_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    logit_counts: tuple[int, ...]  # how many trailing rows of each request yield logits (0: none)
    samples: tuple[bool, ...]  # whether the request's last row yields a new token (else only scores)
    input_ids: tuple[int, ...]  # the query tokens, request after request (empty when they live on the device)
    num_drafts: tuple[int, ...]  # drafts a request verifies (its rows after the first); 0: extend / decode

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @staticmethod
    def idle() -> StepPlan:
        """The plan of a DP group with no work while another group runs: zero rows."""
        return StepPlan(StepMode.IDLE, (), (), (), (), (), (), (), ())

    @staticmethod
    def stand_in(rows: int, requests: int, page_size: int, lookahead: int) -> StepPlan:
        """Dummy requests with `rows` rows in all, standing in for a DP group's plan that failed before the
        step's shared collectives (Engine.fail_step): `requests` of them (at least 1; the last takes the
        remaining rows), each sampling its last row (none samples, or drafts, when the group announced no
        drafting request: a prompt chunk that is not its last), on the reserved page 0 with `lookahead` more
        positions."""
        n = max(1, min(requests, rows))
        q_lens = (1,) * (n - 1) + (rows - n + 1,)
        pages = tuple((0,) * -(-(q + lookahead) // page_size) for q in q_lens)
        return StepPlan(StepMode.EXTEND, (DUMMY_RID,) * n, pages, (0,) * n, q_lens, (1,) * n, (requests > 0,) * n,
                        (0,) * rows, (0,) * n)

    def padded(self, batch: int, rows_per_req: int, page_size: int, mode: StepMode) -> StepPlan:
        """This plan plus dummy requests up to `batch` (an idle group's plan becomes all dummies): each
        has `rows_per_req` rows at positions 0.. on the reserved page 0 and as many logit rows as a real
        request of `mode` (invariant 1: dummies are whole requests in the rows and the metadata alike)."""
        if self.mode not in (mode, StepMode.IDLE):
            raise LayoutError(f"cannot pad a {self.mode.value} plan as {mode.value}")
        extra = batch - len(self.rids)
        logits = self.logit_counts[0] if self.logit_counts else rows_per_req
        pages = (0,) * -(-rows_per_req // page_size)
        ids_known = len(self.input_ids) == self.num_tokens
        return StepPlan(mode, self.rids + (DUMMY_RID,) * extra, self.pages + (pages,) * extra,
                        self.prefix_lens + (0,) * extra, self.q_lens + (rows_per_req,) * extra,
                        self.logit_counts + (logits,) * extra, self.samples + (True,) * extra,
                        self.input_ids + (0,) * (extra * rows_per_req) if ids_known else (),
                        self.num_drafts + ((rows_per_req - 1 if mode is StepMode.VERIFY else 0),) * extra)


@dataclass(frozen=True)
class BatchLayout:
    mode: StepMode
    page_size: int
    prefix_lens: Tensor  # [B] tokens cached before this step
    q_lens: Tensor  # [B] query rows this step
    seq_lens: Tensor  # [B] prefix_lens + q_lens
    row_req: Tensor  # [T] request (row of page_table) of every query row
    row_pos: Tensor  # [T] position of every row
    row_kv_len: Tensor  # [T, 1] keys each row may see: row_pos + 1 (verify rows are causal among themselves)
    out_slots: Tensor  # [T] cache slot of each row's new latent / index key
    page_table: Tensor  # [B, P] page ids; unused entries are page 0 (reserved)
    logit_rows: Tensor  # [L] rows whose logits are computed (trailing logit_counts rows of each request)
    num_tokens: int  # query rows (T)
    key_width: int  # key positions the indexer scores per row (>= max(seq_lens); a bucket under graphs)
    dp_sizes: tuple[int, ...]  # rows of every DP group this step (the MLP sees all of them)
    # Eager steps only (None in a graph's layout, whose key width is a bucket): each request's (end row, seq
    # len) on the host, so that a prefill's indexer scores each chunk of rows only as wide as it sees (keys_of_rows).
    req_rows: tuple[tuple[int, int], ...] | None = None
    # One int32 buffer every tensor field above is a view of (build() uploads it in one copy; a graph fills
    # its static copy in one copy); None once a field was replaced by another tensor (with_logit_rows).
    storage: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.q_lens.shape[0])

    @staticmethod
    def build(plan: StepPlan, page_size: int, device: torch.device, key_width: int | None = None,
              dp_sizes: tuple[int, ...] | None = None, page_width: int | None = None) -> BatchLayout:
        B = len(plan.rids)
        seq_lens = [p + q for p, q in zip(plan.prefix_lens, plan.q_lens)]
        covered = np.fromiter((len(p) for p in plan.pages), dtype=np.int64, count=B) * page_size
        if B and (short := np.flatnonzero(np.asarray(seq_lens, dtype=np.int64) > covered)).size:
            b = int(short[0])
            raise LayoutError(f"request {plan.rids[b]!r} has {seq_lens[b]} tokens but {len(plan.pages[b])} pages "
                              f"of {page_size}")
        pages = plan.pages
        if page_width is None:
            width = max((len(p) for p in pages), default=0)
        else:  # a graph's table is its key width's, whatever pages a request holds past its keys (MTP's lookahead)
            width = page_width
            if B and max(seq_lens) > width * page_size:
                raise LayoutError(f"a request has {max(seq_lens)} tokens, past the page table's {width} pages of "
                                  f"{page_size}")
            pages = tuple(p[:width] for p in pages)
        row_req, row_pos, logit_rows = _rows(plan)
        T = len(row_req)
        shapes = {"prefix_lens": (B,), "q_lens": (B,), "seq_lens": (B,), "row_req": (T,), "row_pos": (T,),
                  "row_kv_len": (T, 1), "out_slots": (T,), "page_table": (B, width), "logit_rows": (len(logit_rows),)}
        sizes = [math.prod(shape) for shape in shapes.values()]
        # Every field starts 16-byte aligned (Triton specializes kernels on pointer alignment: a field's
        # alignment must not depend on the batch). Filled by numpy in one buffer: a graph's page table is
        # its key-width bucket wide (64 x 128 entries at 4K context), too many to pass one by one.
        spans = [-(-n // _ALIGN) * _ALIGN for n in sizes]
        starts = dict(zip(shapes, np.cumsum([0] + spans[:-1]).tolist()))
        host_np = np.zeros(sum(spans), dtype=np.int32)
        table = host_np[starts["page_table"]:starts["page_table"] + B * width].reshape(B, width)
        _fill_table(table, pages)  # (in place: at page size 1 a graph's table holds a page per key position)
        slots = table[row_req, row_pos // page_size].astype(np.int64) * page_size + row_pos % page_size
        values = {"prefix_lens": plan.prefix_lens, "q_lens": plan.q_lens, "seq_lens": seq_lens, "row_req": row_req,
                  "row_pos": row_pos, "row_kv_len": row_pos + 1, "out_slots": slots, "logit_rows": logit_rows}
        for name, field_values in values.items():
            if len(field_values):
                host_np[starts[name]:starts[name] + len(field_values)] = field_values
        host = torch.from_numpy(host_np)
        storage = host.to(device, non_blocking=True)  # one upload per step (it was one per field)
        views = {}
        for (name, shape), size in zip(shapes.items(), sizes):
            flat = storage[starts[name]:starts[name] + size]
            views[name] = flat if len(shape) == 1 else flat.view(shape)  # a view call costs ~4 us of host time
        eager = key_width is None
        return BatchLayout(
            mode=plan.mode, page_size=page_size, num_tokens=T,
            key_width=max(seq_lens, default=0) if eager else key_width,
            dp_sizes=(T,) if dp_sizes is None else tuple(dp_sizes), storage=storage,
            req_rows=tuple(zip(itertools.accumulate(plan.q_lens), seq_lens)) if eager else None, **views)

    def keys_of_rows(self, start: int, stop: int) -> int:
        """The most keys a query row in [start, stop) sees (a graph's layout: its key width). Rows are grouped by
        request, each request's last row sees all of its keys."""
        if self.req_rows is None:
            return self.key_width
        most, begin = 0, 0
        for end, seq_len in self.req_rows:
            if begin >= stop:
                break
            if end > start:  # its rows [begin, end) meet [start, stop): the last one inside sees the most
                most = max(most, seq_len - (end - min(end, stop)))
            begin = end
        return most

    def with_logit_rows(self, rows: Tensor) -> BatchLayout:
        """The same step reading out other rows (the MTP pass samples the last accepted row)."""
        return dataclasses.replace(self, logit_rows=rows, storage=None)

    def shifted(self, shift: Tensor) -> BatchLayout:
        """The same rows, request b's `shift[b]` positions later (or earlier), on the device: a draft step planned
        before the host knows how many drafts each request accepted (spec/drafter.py). The host fields
        (key_width, req_rows) are the plan's: they must bound the shifted lengths (it is planned at the most)."""
        out, shift = self.cloned(), shift.to(torch.int32)
        rows = out.row_req.long()
        by_row = shift[rows]
        out.prefix_lens.add_(shift)
        out.seq_lens.add_(shift)
        out.row_pos.add_(by_row)
        out.row_kv_len.add_(by_row[:, None])
        page = out.page_table[rows, (out.row_pos // self.page_size).long()]
        out.out_slots.copy_(page * self.page_size + out.row_pos % self.page_size)
        return out

    def tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if f.name != "storage" and isinstance(getattr(self, f.name), Tensor)]

    def cloned(self) -> BatchLayout:
        """The same layout in tensors of its own (a graph's static buffers), packed like this one."""
        if self.storage is None:
            return dataclasses.replace(self, **{n: getattr(self, n).clone() for n in self.tensor_fields()})
        storage, base = self.storage.clone(), self.storage.data_ptr()
        views = {}
        for name in self.tensor_fields():
            t = getattr(self, name)
            start = (t.data_ptr() - base) // t.element_size()
            views[name] = storage[start:start + t.numel()].view(t.shape)
        return dataclasses.replace(self, storage=storage, **views)

    def copy_from(self, other: BatchLayout) -> None:
        """Fill this layout's tensors in place from a layout of the same static_key (one copy when both are
        packed alike)."""
        if self.storage is not None and other.storage is not None and self.storage.shape == other.storage.shape:
            self.storage.copy_(other.storage, non_blocking=True)
            return
        for name in self.tensor_fields():
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)

    def static_key(self) -> tuple:
        """Everything that is not a tensor: a replayed graph is valid only for layouts with this key."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if not isinstance(getattr(self, f.name), Tensor)) + tuple(
            (name, tuple(getattr(self, name).shape)) for name in self.tensor_fields())

    def validate(self, num_slots: int | None = None) -> None:
        """Assert the invariants; raise LayoutError naming the tensors on any violation."""
        B, T = self.batch_size, self.num_tokens

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise LayoutError(f"BatchLayout({self.mode.value}): {message}")

        for name in ("prefix_lens", "q_lens", "seq_lens"):
            need(getattr(self, name).shape == (B,), f"{name} has shape {tuple(getattr(self, name).shape)}, "
                                                     f"expected ({B},)")
        for name in ("row_req", "row_pos", "out_slots"):
            need(getattr(self, name).shape == (T,), f"{name} has {getattr(self, name).shape[0]} rows, "
                                                     f"num_tokens is {T}")
        need(self.row_kv_len.shape == (T, 1), f"row_kv_len must be [num_tokens, 1] = [{T}, 1], "
                                              f"got {list(self.row_kv_len.shape)}")
        need(int(self.q_lens.sum()) == T, f"sum(q_lens)={int(self.q_lens.sum())} != num_tokens={T}")
        need(bool((self.seq_lens == self.prefix_lens + self.q_lens).all()), "seq_lens != prefix_lens + q_lens")
        need(self.page_table.shape[0] == B, f"page_table has {self.page_table.shape[0]} rows, batch is {B}")
        real_req = (self.page_table != 0).any(1)  # a dummy request holds only the reserved page 0
        if B:
            need(bool((self.seq_lens <= self.page_table.shape[1] * self.page_size).all()),
                 "a request's seq_len exceeds the pages in its page_table row")
            need(self.key_width >= int(self.seq_lens.max()), f"key_width={self.key_width} < max(seq_lens)="
                                                             f"{int(self.seq_lens.max())}")
            need(bool((real_req[1:] <= real_req[:-1]).all()), "a real request follows a dummy request")
        if T:
            need(bool((self.row_kv_len[:, 0] == self.row_pos + 1).all()), "row_kv_len != row_pos + 1")
            need(bool((self.row_req[1:] >= self.row_req[:-1]).all()), "row_req is not grouped by request")
            real = real_req[self.row_req.long()]
            need(bool((self.out_slots[real] >= self.page_size).all()), "a real row writes into reserved page 0")
            need(bool((self.out_slots[~real] < self.page_size).all()), "a dummy row writes outside page 0")
            if num_slots is not None:
                need(int(self.out_slots.max()) < num_slots, f"out_slots reach {int(self.out_slots.max())}, "
                                                            f"pool has {num_slots} slots")
        if self.logit_rows.numel():
            need(int(self.logit_rows.max()) < T and int(self.logit_rows.min()) >= 0, "a logit row is out of range")

    def check_rows(self, name: str, tensor: Tensor) -> None:
        """Kernel-wrapper check: a tensor handed to attention has exactly num_tokens rows."""
        if tensor.shape[0] != self.num_tokens:
            raise LayoutError(f"{name} has {tensor.shape[0]} rows but the layout describes "
                              f"{self.num_tokens} query rows (metadata rows != query rows)")


def _rows(plan: StepPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row its request and position, and the rows that yield logits (each request's trailing
    logit_counts rows), vectorized: an 8K-token prefill chunk built them in Python in milliseconds."""
    q = np.asarray(plan.q_lens, dtype=np.int64)
    ends = np.cumsum(q)
    row_req = np.repeat(np.arange(len(q)), q)
    first_pos = np.asarray(plan.prefix_lens, dtype=np.int64)
    row_pos = np.arange(int(ends[-1]) if len(q) else 0) - np.repeat(ends - q - first_pos, q)
    counts = np.asarray(plan.logit_counts, dtype=np.int64)
    ranks = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return row_req, row_pos, ranks + np.repeat(ends - counts, counts)


def _fill_table(table: np.ndarray, pages: tuple[Sequence[int], ...]) -> None:
    """Row b's first len(pages[b]) entries are its pages (the rest stay 0): one copy per request, from the
    requests' int32 page arrays (Request.page_ids; converting every page id each step cost milliseconds at page
    size 1 and long contexts)."""
    for row, ids in zip(table, pages):
        row[:len(ids)] = ids
