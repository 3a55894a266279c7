"""Process groups and the collectives the model uses: world (MLP/MoE TP), attention-TP (one DP group).

With `--tp N --dp D --enable-dp-attention`, rank r belongs to DP group r // (N / D); heads of MLA
are split over the N / D ranks of its group, the MLP and MoE over all N ranks. Without DP
attention D = 1 and both groups are the world. With `--ep P` the routed experts are divided among P
expert groups of N / P ranks (rank r holds experts of group r // (N / P), each split over that group's
ranks): the MoE's output is still every rank's partial sum, added by the same all-reduce, so expert
parallelism changes which weights a rank holds, not the collectives. A single device is the same object
with size 1, where every collective is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dsaserve.ops import invariant

Tensor = torch.Tensor
# The group a rank waits in for its leader's next plan: idle time has no deadline (gloo needs a finite one).
WAIT_FOREVER = timedelta(days=3650)


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    dp: int = 1
    rank: int = 0
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp % self.dp:
            raise ValueError(f"--dp ({self.dp}) must divide --tp ({self.tp})")
        if self.ep < 1 or self.tp % self.ep:
            raise ValueError(f"--ep ({self.ep}) must divide --tp ({self.tp})")

    @property
    def moe_tp(self) -> int:
        """Ranks that split each routed expert (its intermediate dim): all of them without expert parallelism."""
        return self.tp // self.ep

    @property
    def moe_rank(self) -> int:
        return self.rank % self.moe_tp

    @property
    def ep_rank(self) -> int:
        """The expert group this rank belongs to: it holds experts [ep_rank * E / ep, (ep_rank + 1) * E / ep)."""
        return self.rank // self.moe_tp

    @property
    def attn_tp(self) -> int:
        return self.tp // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.attn_tp

    @property
    def attn_rank(self) -> int:
        return self.rank % self.attn_tp

    @property
    def is_leader(self) -> bool:
        """The DP group's attention-TP rank 0: it owns the scheduler and receives requests."""
        return self.attn_rank == 0

    @property
    def leader(self) -> int:
        return self.dp_rank * self.attn_tp


class CollectiveFailed(RuntimeError):
    """A collective inside a step raised (--dist-timeout passed, a peer is gone): the group's state is
    unknown, so this rank cannot go on."""


class Parallel:
    """Collectives over the world and the attention-TP group. Tensors ride the device groups; step
    plans and small ints ride gloo groups on the CPU.

    Every collective inside a step waits at most `timeout` (--dist-timeout) for the other ranks; only
    the broadcast of the next plan, where a rank waits for work, has no deadline (`wait` groups). The
    CPU groups are separate from the device groups even on CPU, so that a rank that left a step early
    can never pair its next exchange with another rank's pending tensor collective.
    """

    def __init__(self, cfg: ParallelConfig = ParallelConfig(), timeout: timedelta | None = None):
        self.cfg = cfg
        self.issued = 0  # collectives this rank has entered inside steps (where a failed step stopped)
        self.shared = 0  # of those, the ones the other DP groups join (Engine.fail_step: before the first, a
        # failed group can still stand in for its rows)
        self.world = self.world_cpu = self.attn = self.attn_cpu = self.attn_wait = self.dp_peers = None
        if cfg.tp == 1:
            return
        self.world = dist.group.WORLD
        self.world_cpu = dist.new_group(backend="gloo", timeout=timeout)
        for g in range(cfg.dp):  # every rank creates every group, in the same order
            ranks = list(range(g * cfg.attn_tp, (g + 1) * cfg.attn_tp))
            groups = (dist.new_group(ranks, timeout=timeout), dist.new_group(ranks, backend="gloo", timeout=timeout),
                      dist.new_group(ranks, backend="gloo", timeout=WAIT_FOREVER))
            if g == cfg.dp_rank:
                self.attn, self.attn_cpu, self.attn_wait = groups
        if cfg.dp > 1:  # the same attention rank of every DP group: one copy of each group's rows
            for k in range(cfg.attn_tp):
                group = dist.new_group([g * cfg.attn_tp + k for g in range(cfg.dp)], timeout=timeout)
                if k == cfg.attn_rank:
                    self.dp_peers = group

    @classmethod
    def without_groups(cls, cfg: ParallelConfig) -> Parallel:
        """One rank's shapes and shard indices, with no process group (building or loading one rank of
        a parallel model in a single process, e.g. to test its slices); collectives are unavailable."""
        par = cls()
        par.cfg = cfg
        return par

    @property
    def tp(self) -> int:
        return self.cfg.tp

    # -- tensor collectives (device) -----------------------------------------------------

    def _collective(self, op: Any, *args: Any, across_groups: bool = False, **kwargs: Any) -> None:
        """Every collective of a step: counted, and a failure inside it is a CollectiveFailed."""
        self.issued += 1
        self.shared += across_groups
        try:
            op(*args, **kwargs)
        except Exception as exc:
            raise CollectiveFailed(f"{op.__name__} failed on rank {self.cfg.rank}: {exc}") from exc

    def all_reduce_world(self, x: Tensor, ordered: bool = False) -> Tensor:
        """Sum x over every rank, in place. ordered: the ranks' parts added in rank order (deterministic
        inference: a ring's order for an element follows the buffer's size, and so the batch)."""
        if self.cfg.tp > 1:
            if ordered:
                return self._ordered_sum(x, self.world, self.cfg.tp, across_groups=True)
            self._collective(dist.all_reduce, x, group=self.world, across_groups=True)
        return x

    def all_reduce_attn(self, x: Tensor, ordered: bool = False) -> Tensor:
        """Sum x over the attention-TP group, in place (ordered: as all_reduce_world)."""
        if self.cfg.attn_tp > 1:
            if ordered:
                return self._ordered_sum(x, self.attn, self.cfg.attn_tp)
            self._collective(dist.all_reduce, x, group=self.attn)
        return x

    def _ordered_sum(self, x: Tensor, group: Any, size: int, across_groups: bool = False) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        self._collective(dist.all_gather, parts, x.contiguous(), group=group, across_groups=across_groups)
        return x.copy_(invariant.ordered_sum(parts))

    def broadcast_attn(self, x: Tensor) -> Tensor:
        """The attention-group leader's `x` on every rank of the group (in place)."""
        if self.cfg.attn_tp > 1:
            self._collective(dist.broadcast, x, src=self.cfg.leader, group=self.attn)
        return x

    def all_gather_attn(self, x: Tensor) -> Tensor:
        """Concatenate the attention group's shards along the last dim (vocab-parallel logits)."""
        if self.cfg.attn_tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.cfg.attn_tp)]
        self._collective(dist.all_gather, parts, x.contiguous(), group=self.attn)
        return torch.cat(parts, dim=-1)

    def attn_row_share(self, rows: int) -> slice:
        """This rank's share of `rows` rows that the attention group splits: every attn_tp-th row from its rank.
        Strided, so that causal rows (later ones see more keys) load the ranks evenly."""
        return slice(self.cfg.attn_rank, rows, self.cfg.attn_tp)

    def all_gather_attn_rows(self, x: Tensor, rows: int) -> Tensor:
        """The whole [rows, ...] from every rank's attn_row_share(rows) of it (x: this rank's)."""
        tp = self.cfg.attn_tp
        padded = x.new_zeros(-(-rows // tp), *x.shape[1:])  # the first ranks' shares are one row longer
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(tp)]
        self._collective(dist.all_gather, parts, padded, group=self.attn)
        return torch.stack(parts, dim=1).flatten(0, 1)[:rows]  # row j * tp + r is rank r's j-th

    def attn_heads_to_rows(self, x: Tensor) -> Tensor:
        """[rows, this rank's heads, ...] on every rank of the attention group -> [this rank's attn_row_share of the
        rows, the group's heads (rank 0's first), ...]: one all-to-all turns the head split into a row split."""
        tp, rows = self.cfg.attn_tp, x.shape[0]
        share = -(-rows // tp)  # (the last ranks' shares may be a row shorter: rows never read fill them)
        send = x.new_empty(tp * share, *x.shape[1:])  # rank r's block: rows r, r + tp, ...
        row = torch.arange(rows, device=x.device)
        send.index_copy_(0, row % tp * share + row // tp, x)
        recv = torch.empty_like(send)  # source rank s's block: my rows, s's heads
        self._collective(dist.all_to_all_single, recv, send, group=self.attn)
        del send
        mine = len(range(rows)[self.attn_row_share(rows)])
        return recv.view(tp, share, *x.shape[1:])[:, :mine].transpose(0, 1).flatten(1, 2)

    def attn_rows_to_heads(self, x: Tensor, rows: int) -> Tensor:
        """The inverse of attn_heads_to_rows: [this rank's share of `rows`, the group's heads, ...] -> [rows, this
        rank's heads, ...]."""
        tp, mine = self.cfg.attn_tp, x.shape[0]
        share, heads = -(-rows // tp), x.shape[1] // tp
        send = x.new_empty(tp, share, heads, *x.shape[2:])  # rank r's block: its heads of my rows
        send[:, :mine] = x.reshape(mine, tp, heads, *x.shape[2:]).transpose(0, 1)
        recv = torch.empty_like(send)  # source rank s's block: s's rows, my heads
        self._collective(dist.all_to_all_single, recv, send, group=self.attn)
        del send
        return recv.transpose(0, 1).flatten(0, 1)[:rows]  # row j * tp + s is rank s's j-th

    def gather_dp_rows(self, x: Tensor, dp_sizes: tuple[int, ...]) -> Tensor:
        """Every DP group's real rows, group after group: [sum(dp_sizes), hidden].

        The transport pads each group's rows to max(dp_sizes) (collectives need one shape); the
        padding is dropped before the MLP, so the MLP and MoE compute real rows only.
        """
        if self.cfg.dp == 1:
            return x
        pad_to = max(dp_sizes)
        padded = x.new_zeros(pad_to, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.cfg.dp)]
        self._collective(dist.all_gather, parts, padded, group=self.dp_peers, across_groups=True)
        return torch.cat([part[:size] for part, size in zip(parts, dp_sizes)], dim=0)

    def own_dp_rows(self, x: Tensor, dp_sizes: tuple[int, ...]) -> Tensor:
        """This DP group's rows back out of the gathered batch."""
        if self.cfg.dp == 1:
            return x
        start = sum(dp_sizes[: self.cfg.dp_rank])
        return x[start:start + dp_sizes[self.cfg.dp_rank]]

    def close(self) -> None:
        """Leave the process groups together, after a stop every rank agreed on: a CPU barrier, then each
        rank tears its groups down, so no rank exits while a peer still talks to it (an exit that cut a
        peer's gloo connections mid-teardown once aborted that peer's process)."""
        if self.cfg.tp == 1 or not dist.is_initialized():
            return
        dist.barrier(group=self.world_cpu)
        dist.destroy_process_group()

    # -- step synchronisation (CPU) -------------------------------------------------------

    def broadcast_from_leader(self, obj: Any) -> Any:
        """The DP group leader's object (the step plan) on every rank of its group. The other ranks
        wait here for their leader's next step, as long as it takes, blocked (no CPU)."""
        if self.cfg.attn_tp == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.cfg.leader, group=self.attn_wait)
        return box[0]

    def exchange(self, values: list[int]) -> list[list[int]]:
        """All ranks' small int vectors (same length), so every rank agrees on the step's shape."""
        if self.cfg.tp == 1:
            return [values]
        mine = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.cfg.tp)]
        dist.all_gather(parts, mine, group=self.world_cpu)
        return [p.tolist() for p in parts]

    def check_same_in_attn_group(self, name: str, x: Tensor) -> None:
        """Checked mode: replicated results (the indexer's top-k) must agree across the group."""
        if self.cfg.attn_tp == 1:
            return
        flat = x.detach().long().cpu().flatten()
        weights = torch.arange(1, flat.numel() + 1)
        digest = torch.tensor([flat.numel(), int(flat.sum()), int((flat * weights).sum())], dtype=torch.int64)
        parts = [torch.empty_like(digest) for _ in range(self.cfg.attn_tp)]
        self._collective(dist.all_gather, parts, digest, group=self.attn_cpu)
        if any(not torch.equal(p, parts[0]) for p in parts):
            raise AssertionError(f"{name} differs across the attention-TP ranks of DP group {self.cfg.dp_rank}")
