"""Host time of a step's page handling, per step, without a model: the scheduler's page ids of every request
(Request.page_ids), BatchLayout.build of a verify plan (S = 3) on a graph's key-width table, the plan's pickle
round trip with every page id (how lockstep sent it to the other ranks of a group), and what lockstep sends now:
the pages each request added since the last step (engine/page_sync.py: encode, pickle round trip, decode; each
step adds S + 1 tokens' pages). Page size 1 holds a page per token, so the first three grow with the batch's
whole context:

    python benchmarks/plan_host.py [--cases 16x4096 64x1024 16x32768 64x32768] [--page-sizes 64 1]
        [--output-json plan_host.json]
"""
from __future__ import annotations

import argparse
import json
import pickle
import time

import torch

from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
from dsaserve.engine.page_sync import PageReceiver, PageSender
from dsaserve.engine.request import Request, SamplingParams

SPEC_STEPS = 3
KEY_BUCKET = 1024


def _requests(batch: int, context: int, page_size: int) -> list[Request]:
    reqs = []
    for b in range(batch):
        req = Request(f"r{b}", [1], SamplingParams(), 1, b, seed=b)
        req.pages = list(range(1 + 100_000 * b, 1 + 100_000 * b + -(-(context + 2 * SPEC_STEPS) // page_size)))
        reqs.append(req)
    return reqs


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeats


def _plan(reqs: list[Request], context: int) -> StepPlan:
    batch, rows = len(reqs), SPEC_STEPS + 1
    return StepPlan(StepMode.VERIFY, tuple(r.rid for r in reqs), tuple(r.page_ids() for r in reqs),
                    (context,) * batch, (rows,) * batch, (rows,) * batch, (True,) * batch,
                    tuple(range(batch * rows)), (SPEC_STEPS,) * batch)


def _group_step(reqs: list[Request], context: int, page_size: int, sender: PageSender,
                receiver: PageReceiver) -> None:
    """One step's plan to a group: each request's context grows by S + 1 tokens, then encode -> pickle -> decode."""
    for r in reqs:
        context_now = len(r.pages) * page_size + SPEC_STEPS + 1
        r.pages += list(range(len(r.pages) + 10**7, -(-context_now // page_size) + 10**7))
    plain, deltas = sender.encode(_plan(reqs, context), {r.rid: r for r in reqs})
    receiver.decode(*pickle.loads(pickle.dumps((plain, deltas))))


def measure(batch: int, context: int, page_size: int, repeats: int) -> dict[str, float | int]:
    reqs = _requests(batch, context, page_size)
    plan = _plan(reqs, context)
    keys = -(-(context + 2 * SPEC_STEPS) // KEY_BUCKET) * KEY_BUCKET
    cpu = torch.device("cpu")
    sender, receiver = PageSender(), PageReceiver()
    return {"batch": batch, "context": context, "page_size": page_size, "pages": sum(len(r.pages) for r in reqs),
            "page_ids_ms": _ms(lambda: [r.page_ids() for r in reqs], repeats),
            "build_ms": _ms(lambda: BatchLayout.build(plan, page_size, cpu, key_width=keys,
                                                      page_width=-(-keys // page_size)), repeats),
            "pickle_ms": _ms(lambda: pickle.loads(pickle.dumps(plan)), repeats),
            "to_group_ms": _ms(lambda: _group_step(reqs, context, page_size, sender, receiver), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["16x4096", "64x1024", "16x32768", "64x32768"],
                        help="BATCHxCONTEXT")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    results = []
    print(f"{'batch':>5} {'context':>7} {'page':>4} {'pages':>8} {'page_ids ms':>11} {'build ms':>9} {'pickle ms':>9} "
          f"{'to group ms':>11}")
    for case in args.cases:
        batch, context = (int(v) for v in case.split("x"))
        for page_size in args.page_sizes:
            r = measure(batch, context, page_size, args.repeats)
            results.append(r)
            print(f"{batch:5d} {context:7d} {page_size:4d} {r['pages']:8d} {r['page_ids_ms']:11.3f} "
                  f"{r['build_ms']:9.3f} {r['pickle_ms']:9.3f} {r['to_group_ms']:11.3f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
