"""A client may reuse a request id once the earlier request's final output came. Under attention TP the leader
sends each plan's page ids to the other ranks as what changed per rid (engine/page_sync.py): a new request
reusing an ended one's rid, with the same page generation (they count per request), got only its pages past the
old one's count and the other rank put the old request's pages before them, so that rank wrote its KV into pages
the prefix cache held for the old prompt. Two real gloo ranks (--tp 2) on CPU; the plans' pages on both ranks and
the greedy tokens of the new request and of one that hits the old prompt's cached prefix equal the
single device's."""
from __future__ import annotations

import traceback
from typing import Any

import torch

from conftest import gloo_ranks
from dsaserve import LLM, SamplingParams
from dsaserve.server_args import ServerArgs

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _prompts() -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(5, 500, (20,), generator=gen).tolist(), torch.randint(5, 500, (32,), generator=gen).tolist()


def _run(engine: Any, tokens: dict[str, list[int]]) -> None:
    for _ in range(200):
        for out in engine.step(keep_alive=True):
            tokens[out.rid] = tokens.get(out.rid, []) + out.new_token_ids
        if not engine.requests:
            return


def _rank(rank: int, addr: str, model: str, out: Any) -> None:
    try:
        from dsaserve.engine.engine import Engine
        from dsaserve.engine.lockstep import follow
        from dsaserve.parallel.launch import init_distributed
        args = ServerArgs(model_path=model, tp=2, page_size=4, max_total_tokens=512, skip_server_warmup=True)
        par = init_distributed(args, rank, addr)
        engine = Engine(args, progress=False, par=par)
        plans: list[dict[str, list[int]]] = []  # per plan: each request's pages as this rank runs them
        side = engine.page_sender if par.cfg.is_leader else engine.page_receiver
        name = "encode" if par.cfg.is_leader else "decode"
        original = getattr(side, name)

        def recording(plan: Any, *rest: Any) -> Any:
            result = original(plan, *rest)
            seen = plan if par.cfg.is_leader else result  # (the leader's plan before encoding holds the pages)
            plans.append({rid: [int(p) for p in pages] for rid, pages in zip(seen.rids, seen.pages)})
            return result
        setattr(side, name, recording)
        tokens: dict[str, list[int]] = {}
        if par.cfg.is_leader:
            old, new = _prompts()
            engine.add_request("a", old, GREEDY)
            while len(engine.requests["a"].output_ids) < 2:
                engine.step(keep_alive=True)
            assert engine.abort("a")
            engine.take_finished()
            engine.add_request("a", new, GREEDY)  # the same rid, the next plan
            _run(engine, tokens)
            engine.add_request("b", old, GREEDY)  # its prefix is cached in the first "a"'s pages
            _run(engine, tokens)
            engine.step(stop=True)
        else:
            follow(engine)
        par.exchange([0])
        out.put((rank, {"plans": plans, "tokens": tokens}))
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put((rank, {"error": traceback.format_exc()}))


def test_a_reused_rid_runs_on_its_own_pages_on_every_rank(tiny_ds: str) -> None:
    got = gloo_ranks(_rank, 2, tiny_ds)
    assert all("error" not in got[r] for r in (0, 1)), [got[r].get("error") for r in (0, 1)]
    assert got[1]["plans"] == got[0]["plans"]
    old, new = _prompts()
    single = LLM(tiny_ds, page_size=4, max_total_tokens=512).generate([new, old], GREEDY)
    assert [got[0]["tokens"]["a"], got[0]["tokens"]["b"]] == [c.token_ids for c in single]
