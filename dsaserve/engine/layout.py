"""BatchLayout: the single description of one forward step; every per-step tensor derives from it."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


class StepMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"
    VERIFY = "verify"
    DRAFT_EXTEND = "draft_extend"
    IDLE = "idle"


class LayoutError(AssertionError):
    """A layout or kernel input violates an invariant (raised only in checked mode)."""


def checks_enabled() -> bool:
    return os.environ.get("DSASERVE_CHECKS", "0") == "1"


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler decided, in Python lists: one entry per request in the step."""
    mode: StepMode
    rids: tuple[str, ...]
    pages: tuple[tuple[int, ...], ...]  # page ids of each request, covering seq_len tokens
    prefix_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    samples: tuple[bool, ...]  # whether the request's last row yields a token this step
    input_ids: tuple[int, ...]  # the num_tokens query tokens, request after request

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @staticmethod
    def idle() -> StepPlan:
        """The plan of a DP group with no work while another group runs: zero rows."""
        return StepPlan(StepMode.IDLE, (), (), (), (), (), ())


@dataclass(frozen=True)
class BatchLayout:
    mode: StepMode
    page_size: int
    prefix_lens: Tensor  # [B] tokens cached before this step
    q_lens: Tensor  # [B] query rows this step
    seq_lens: Tensor  # [B] prefix_lens + q_lens
    row_req: Tensor  # [T] request (row of page_table) of every real query row
    row_pos: Tensor  # [T] position of every row
    row_kv_len: Tensor  # [T, 1] keys each row may see: row_pos + 1
    out_slots: Tensor  # [T] cache slot of each row's new latent / index key
    page_table: Tensor  # [B, P] page ids; unused entries are page 0 (reserved)
    logit_rows: Tensor  # [S] rows whose logits are sampled (last row of each sampling request)
    num_tokens: int  # real query rows
    max_kv_len: int  # max(seq_lens), for sizing indexer logits

    @property
    def batch_size(self) -> int:
        return int(self.q_lens.shape[0])

    @staticmethod
    def build(plan: StepPlan, page_size: int, device: torch.device) -> BatchLayout:
        B = len(plan.rids)
        seq_lens = [p + q for p, q in zip(plan.prefix_lens, plan.q_lens)]
        width = max((len(p) for p in plan.pages), default=0)
        table = [list(p) + [0] * (width - len(p)) for p in plan.pages]
        row_req, row_pos, logit_rows = [], [], []
        for b, (prefix, q) in enumerate(zip(plan.prefix_lens, plan.q_lens)):
            row_req += [b] * q
            row_pos += range(prefix, prefix + q)
            if plan.samples[b]:
                logit_rows.append(len(row_pos) - 1)

        def t(values: list[int], shape: tuple[int, ...] | None = None) -> Tensor:
            x = torch.tensor(values, dtype=torch.int32)
            return (x.view(shape) if shape else x).to(device, non_blocking=True)

        pt = t([v for row in table for v in row], (B, width))
        rr, rp = t(row_req), t(row_pos)
        slots = [table[r][p // page_size] * page_size + p % page_size for r, p in zip(row_req, row_pos)]
        T = len(row_req)
        layout = BatchLayout(
            mode=plan.mode, page_size=page_size, prefix_lens=t(list(plan.prefix_lens)),
            q_lens=t(list(plan.q_lens)), seq_lens=t(seq_lens), row_req=rr, row_pos=rp,
            row_kv_len=t([p + 1 for p in row_pos], (T, 1)), out_slots=t(slots), page_table=pt,
            logit_rows=t(logit_rows), num_tokens=T,
            max_kv_len=max(seq_lens, default=0))
        return layout

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
        if B:
            need(bool((self.seq_lens <= self.page_table.shape[1] * self.page_size).all()),
                 "a request's seq_len exceeds the pages in its page_table row")
            need(self.max_kv_len == int(self.seq_lens.max()), "max_kv_len != max(seq_lens)")
        if T:
            need(bool((self.row_kv_len[:, 0] == self.row_pos + 1).all()), "row_kv_len != row_pos + 1")
            need(bool((self.row_req[1:] >= self.row_req[:-1]).all()), "row_req is not grouped by request")
            need(bool((self.out_slots >= self.page_size).all()), "a row writes into reserved page 0")
            if num_slots is not None:
                need(int(self.out_slots.max()) < num_slots, f"out_slots reach {int(self.out_slots.max())}, "
                                                            f"pool has {num_slots} slots")
        need(self.logit_rows.numel() <= B, f"{self.logit_rows.numel()} logit rows for {B} requests")

    def check_rows(self, name: str, tensor: Tensor) -> None:
        """Kernel-wrapper check: a tensor handed to attention has exactly num_tokens rows."""
        if tensor.shape[0] != self.num_tokens:
            raise LayoutError(f"{name} has {tensor.shape[0]} rows but the layout describes "
                              f"{self.num_tokens} query rows (metadata rows != query rows)")
