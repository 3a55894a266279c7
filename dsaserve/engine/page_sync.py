"""A step's page ids reach the other ranks of an attention group as what changed since the last step, not as
every page of every request: at page size 1 a request holds a page per token, and pickling a 64 x 32K batch's
pages to each rank took 9 ms a step (benchmarks/plan_host.py).

The leader remembers, per request of its last plan, the request, its page generation (PageMirror) and how many
pages it sent; the same request with the same generation in the new plan sends only the pages past those, any
other sends them all (a new request may reuse an ended one's id, and generations count per request).
Each other rank keeps the same requests' pages as PageArrays and extends them. Both sides keep only the
requests of the latest plan, so they always agree on what the other holds (a request absent for a step sends
all its pages when it comes back)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from dsaserve.cache.pages import PageArray
from dsaserve.engine.layout import StepPlan
from dsaserve.engine.request import Request

@dataclass(frozen=True)
class PageDeltas:
    """Per request of a plan: its page generation, the pages the receiver already holds, and how many follow them
    in `pages` (every request's new pages in one array: one pickled array, not one per request)."""
    generations: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    pages: np.ndarray


@dataclass
class PageSender:
    """The group leader's side."""
    sent: dict[str, tuple[Request, int, int]] = field(default_factory=dict)  # rid -> (request, generation, pages)

    def encode(self, plan: StepPlan, requests: dict[str, Request]) -> tuple[StepPlan, PageDeltas]:
        generations, starts, tails, sent = [], [], [], {}
        for rid, pages in zip(plan.rids, plan.pages):
            req = requests[rid]
            generation = req.page_mirror.generation
            before, held_generation, held = self.sent.get(rid, (None, -1, 0))
            start = held if before is req and held_generation == generation and held <= len(pages) else 0
            generations.append(generation)
            starts.append(start)
            tails.append(pages[start:])
            sent[rid] = (req, generation, len(pages))
        self.sent = sent
        flat = np.concatenate(tails).astype(np.int32, copy=False) if tails else np.zeros(0, dtype=np.int32)
        return dataclasses.replace(plan, pages=()), PageDeltas(tuple(generations), tuple(starts),
                                                               tuple(len(t) for t in tails), flat)


@dataclass
class PageReceiver:
    """Every other rank's side."""
    held: dict[str, tuple[int, PageArray]] = field(default_factory=dict)

    def decode(self, plan: StepPlan, deltas: PageDeltas) -> StepPlan:
        held, pages, offset = {}, [], 0
        for rid, generation, start, count in zip(plan.rids, deltas.generations, deltas.starts, deltas.counts):
            known = self.held.get(rid)
            if known is None or known[0] != generation or start == 0:
                known = (generation, PageArray())
            if known[1].size != start:
                raise RuntimeError(f"request {rid!r}: the leader sent pages from {start}, this rank holds "
                                   f"{known[1].size}")
            known[1].extend(deltas.pages[offset:offset + count])
            offset += count
            held[rid] = known
            pages.append(known[1].view())
        self.held = held
        return dataclasses.replace(plan, pages=tuple(pages))
