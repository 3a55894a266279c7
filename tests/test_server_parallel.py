"""Parallel serving through the live server: the reported deployment's flags (partial DP attention,
MTP speculative decoding with S = 3, graph buckets of 2, page size 1) under asymmetric routed_dp_rank
load, and pure TP; greedy tokens equal the single-device, non-speculative run; the server stays
healthy and exits cleanly."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from server_process import ServerProcess, descendants, is_running

pytestmark = pytest.mark.timeout(300)
PROMPTS = prompts_ids(4, [5, 30, 12, 21], seed=31)  # below and above index_topk (16)
MAX = 8
EXTRA = {"return_tokens_as_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def expected(tiny_ds: str) -> list[list[int]]:
    llm = LLM(tiny_ds, page_size=1, max_total_tokens=2048)
    return [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX, temperature=0.0,
                                                                      ignore_eos=True))]


async def _routed(url: str, model: str, ranks: list[int]) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: list[int], rank: int) -> list[int]:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX, temperature=0, logprobs=0,
                                            extra_body={**EXTRA, "routed_dp_rank": rank})
        return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]

    try:
        return await asyncio.gather(*(one(p, r) for p, r in zip(PROMPTS, ranks)))
    finally:
        await client.close()


def _json_on_each_rank(url: str, model: str) -> list[dict]:
    """A grammar request to an idle server, on DP rank 1, then 0: the rank whose compile ended wakes every rank
    (under DP attention they step together), so each request ends instead of waiting forever."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "enum": [0]}}, "required": ["n"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    replies = [client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                         extra_body={"response_format": fmt, "routed_dp_rank": rank}) for rank in (1, 0)]
    return [json.loads(r.choices[0].text) for r in replies]


def test_asymmetric_dp_routing(tiny_ds: str, expected: list[list[int]], tmp_path: Path) -> None:
    flags = dict(tp=4, dp=2, enable_dp_attention=True, page_size=1, max_total_tokens=2048, cuda_graph_max_bs=2,
                 speculative_algorithm="NEXTN", speculative_num_steps=3, speculative_eagle_topk=1,
                 speculative_num_draft_tokens=4)
    server = ServerProcess(tiny_ds, tmp_path / "server.log", **flags)
    with server:
        model = Path(tiny_ds).name
        for ranks in ([0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]):  # 1 vs 3, 3 vs 1, 0 vs 4, 4 vs 0
            assert asyncio.run(_routed(server.url, model, ranks)) == expected, f"routed to {ranks}"
        assert _json_on_each_rank(server.url, model) == [{"n": 0}] * 2  # (compiled beside rank 1's loop, then 0's)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        info = server.server_info()
        ranks_info = info["internal_states"]  # one entry per DP rank
        assert len(ranks_info) == 2 and all(r["running"] == 0 and r["waiting"] == 0 for r in ranks_info)
        bad = httpx.post(f"{server.url}/v1/completions", timeout=30,
                         json={"model": model, "prompt": [5, 6], "max_tokens": 2, "routed_dp_rank": 2})
        assert bad.status_code == 400 and "routed_dp_rank" in bad.text
        tree = descendants(server.proc.pid)
        assert len(tree) >= 4  # one process per rank
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        deadline = time.monotonic() + 10
        while any(is_running(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(is_running(pid) for pid in tree), "a rank process outlived the server"
    assert "Traceback" not in server.log(), server.log()[-3000:]  # every rank left its loop cleanly


@pytest.mark.parametrize("ep", [1, 2])
def test_pure_tp_server(ep: int, tiny_ds: str, expected: list[list[int]], tmp_path: Path) -> None:
    """--tp 2, and --tp 2 --ep 2 (each rank holds half of the routed experts, whole): the single device's tokens."""
    with ServerProcess(tiny_ds, tmp_path / "server.log", tp=2, ep=ep, page_size=1, max_total_tokens=2048) as server:
        assert asyncio.run(_routed(server.url, Path(tiny_ds).name, [0, 0, 0, 0])) == expected


def test_an_idle_dp_group_reports_the_steps_it_joined(tiny_ds: str, tmp_path: Path) -> None:
    """Under DP attention an idle group joins every step of the others; its statistics say so once it is idle. Each
    group reports its share of --max-running-requests and --chunked-prefill-size.
    (Its step count stayed stale for good: progress-only statistics wait out an interval for a next step.)"""
    flags = dict(tp=2, dp=2, enable_dp_attention=True, page_size=4, max_total_tokens=2048, max_running_requests=6,
                 chunked_prefill_size=1024)
    with ServerProcess(tiny_ds, tmp_path / "server.log", **flags) as server:
        # each group's scheduler takes its share of the totals (SGLang's rule)
        states = server.server_info()["internal_states"]
        limits = [(s["max_running_requests"], s["chunked_prefill_size"]) for s in states]
        assert limits == [(3, 512)] * 2, limits
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": Path(tiny_ds).name, "prompt": [5, 9, 14, 3, 77, 21], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "routed_dp_rank": 1})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20  # a bound: the old code never agreed
        while len({s["steps"] for s in server.server_info()["internal_states"]}) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        steps = [s["steps"] for s in server.server_info()["internal_states"]]
        assert steps[0] == steps[1] > 0, steps
