"""Idle and partly failed parallel deployments (real rank processes, gloo on loopback).

Idle ranks sleep (no CPU) and wait for work longer than --dist-timeout; the store and every
internal socket listen on loopback; statistics stay readable while the engine cannot answer; a
killed or hung rank makes /health fail within seconds, ends every request with a 503 that names
the rank, and every rank process is reaped.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from dsaserve import LLM, SamplingParams
from dsaserve.server.supervisor import HUNG_AFTER_S
from server_process import ServerProcess, cpu_seconds, descendants, free_port, listening_addresses, module_server

pytestmark = pytest.mark.timeout(300)
DIST_TIMEOUT_S = 3
IDLE_S = 6.0  # twice --dist-timeout
CPU_BOUND = 0.05  # of one core: an idle rank sleeps (a spinning one uses ~1.0)
PROMPT = [5, 9, 14, 3, 77, 21]
FLAGS = dict(page_size=4, max_total_tokens=2048, dist_timeout=DIST_TIMEOUT_S)


def _server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory, **flags: object):
    port = free_port()
    for srv in module_server(tiny_ds, tmp_path_factory, dist_init_addr=f"127.0.0.1:{port}", **FLAGS, **flags):
        srv.store_port = port
        yield srv


@pytest.fixture(scope="module")
def tp2(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from _server(tiny_ds, tmp_path_factory, tp=2)


@pytest.fixture(scope="module")
def dp2(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from _server(tiny_ds, tmp_path_factory, tp=2, dp=2, enable_dp_attention=True)


@pytest.fixture(scope="module")
def expected(tiny_ds: str) -> list[int]:
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=2048)
    return llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids


def rank_pids(server: ServerProcess) -> dict[int, int]:
    """rank -> pid; rank 0 is the process that hosts the store (it listens on the store port)."""
    pids = [pid for pid in descendants(server.proc.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    store = [pid for pid in pids if f"127.0.0.1:{server.store_port}" in listening_addresses(pid)]
    assert len(pids) == 2 and len(store) == 1, (pids, store)
    return {0: store[0], 1: next(pid for pid in pids if pid != store[0])}


def greedy(server: ServerProcess, dp_rank: int | None = None) -> list[int]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True, "routed_dp_rank": dp_rank}
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "model": model}, timeout=60)
    assert r.status_code == 200, r.text
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def idle_cpu(pids: list[int], seconds: float) -> dict[int, float]:
    """Share of one core each process used over `seconds` (CPU time, not wall time: load-proof)."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(seconds)
    return {pid: (cpu_seconds(pid) - before[pid]) / seconds for pid in pids}


def wait_health_503(server: ServerProcess, within: float) -> tuple[float, str]:
    start = time.monotonic()
    while time.monotonic() - start < within:
        r = httpx.get(f"{server.url}/health", timeout=5)
        if r.status_code == 503:
            return time.monotonic() - start, r.json()["error"]["message"]
        time.sleep(0.1)
    raise AssertionError(f"/health still answered {r.status_code} after {within} s")


def assert_reaped(pids: list[int], within: float = 5.0) -> None:
    """Gone from /proc entirely: exited and waited for (no zombies)."""
    deadline = time.monotonic() + within
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "rank processes were not reaped"


# -- pure TP ------------------------------------------------------------------------------------

def test_idle_tp_ranks_sleep_and_outlive_the_dist_timeout(tp2: ServerProcess, expected: list[int]) -> None:
    assert greedy(tp2) == expected
    usage = idle_cpu(list(rank_pids(tp2).values()), IDLE_S)
    assert all(u < CPU_BOUND for u in usage.values()), f"idle ranks used CPU: {usage}"
    assert greedy(tp2) == expected, "the deployment did not survive an idle period longer than --dist-timeout"
    assert httpx.get(f"{tp2.url}/health", timeout=10).status_code == 200


def test_store_and_internal_sockets_listen_on_loopback(tp2: ServerProcess) -> None:
    pids = [tp2.proc.pid, *descendants(tp2.proc.pid)]
    addresses = {pid: listening_addresses(pid) for pid in pids}
    assert f"127.0.0.1:{tp2.store_port}" in addresses[rank_pids(tp2)[0]]
    found = [a for addrs in addresses.values() for a in addrs]
    assert len(found) >= 4 and all(a.startswith(("127.0.0.1:", "[::1]:")) for a in found), addresses


def test_statistics_are_readable_while_the_engine_cannot_answer(tp2: ServerProcess) -> None:
    leader = rank_pids(tp2)[0]
    os.kill(leader, signal.SIGSTOP)  # shorter than the hang limit: the deployment stays up
    try:
        metrics = httpx.get(f"{tp2.url}/metrics", timeout=5).text
        states = tp2.server_info()["internal_states"]
    finally:
        os.kill(leader, signal.SIGCONT)
    assert 'dsaserve_num_running_reqs{dp_rank="0"} 0.0' in metrics
    assert 'dsaserve_token_usage{dp_rank="0"} 0.0' in metrics
    assert states[0]["running"] == 0 and states[0]["free_pages"] == states[0]["total_pages"] > 0


def test_killed_follower_fails_health_and_every_request(tp2: ServerProcess) -> None:
    model = httpx.get(f"{tp2.url}/v1/models", timeout=30).json()["data"][0]["id"]
    client = openai.OpenAI(base_url=f"{tp2.url}/v1", api_key="x", max_retries=0, timeout=30)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=1500, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    ranks = rank_pids(tp2)
    os.kill(ranks[1], signal.SIGKILL)
    took, message = wait_health_503(tp2, within=5.0)
    assert "rank 1" in message and "SIGKILL" in message, message
    with pytest.raises(openai.APIError, match="rank 1"):
        for _ in stream:
            pass
    r = httpx.post(f"{tp2.url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2}, timeout=5)
    assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
    assert httpx.get(f"{tp2.url}/health_generate", timeout=5).status_code == 503
    assert_reaped(list(ranks.values()))
    assert tp2.stop() == 0


# -- DP attention -------------------------------------------------------------------------------

def test_idle_dp_attention_leaders_sleep_and_wake_together(dp2: ServerProcess, expected: list[int]) -> None:
    assert greedy(dp2, 0) == expected and greedy(dp2, 1) == expected
    usage = idle_cpu(list(rank_pids(dp2).values()), IDLE_S)
    assert all(u < CPU_BOUND for u in usage.values()), f"idle DP leaders used CPU: {usage}"
    assert greedy(dp2, 1) == expected and greedy(dp2, 0) == expected


def test_hung_rank_fails_health_and_requests(dp2: ServerProcess) -> None:
    ranks = rank_pids(dp2)
    os.kill(ranks[1], signal.SIGSTOP)  # alive but frozen: only its missing heartbeat tells
    took, message = wait_health_503(dp2, within=HUNG_AFTER_S + 5)
    assert "rank 1 (DP group 1)" in message and "stopped responding" in message, message
    r = httpx.post(f"{dp2.url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}},
                   timeout=5)
    assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
    assert_reaped(list(ranks.values()))
    assert dp2.stop() == 0
