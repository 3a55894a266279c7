"""Two nodes on one machine (`--nnodes 2 --node-rank 0|1 --dist-init-addr 127.0.0.1:PORT`, two
`dsaserve serve` processes): greedy tokens equal the single-device run; node 1 ends with node 0."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import openai
import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.parallel.launch import _store, check_nodes_agree
from dsaserve.server_args import ServerArgs, SettingError
from server_process import ServerProcess, free_port

pytestmark = pytest.mark.timeout(300)
PROMPTS = prompts_ids(4, [5, 30, 12, 21], seed=31)
MAX = 8


async def _greedy(url: str, model: str) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: list[int]) -> list[int]:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX, temperature=0, logprobs=0,
                                            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]

    try:
        return await asyncio.gather(*(one(p) for p in PROMPTS))
    finally:
        await client.close()


def test_two_nodes_match_the_single_device(tiny_ds: str, tmp_path: Path) -> None:
    llm = LLM(tiny_ds, page_size=1, max_total_tokens=2048)
    expected = [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX, temperature=0.0,
                                                                          ignore_eos=True))]
    flags = dict(tp=2, nnodes=2, dist_init_addr=f"127.0.0.1:{free_port()}", page_size=1, max_total_tokens=2048)
    other = ServerProcess(tiny_ds, tmp_path / "node1.log", node_rank=1, **flags)
    other.launch()  # node 1 has no HTTP server: it runs rank 1 and waits for node 0
    try:
        with ServerProcess(tiny_ds, tmp_path / "node0.log", node_rank=0, **flags) as node0:
            assert asyncio.run(_greedy(node0.url, Path(tiny_ds).name)) == expected
            assert node0.stop() == 0
        assert other.proc.wait(30) == 0, other.log()[-3000:]
        assert "dsaserve node 1 running ranks [1]" in other.log()
    finally:
        other.stop()


def _handshake(node_args: list[tuple[ServerArgs, int] | tuple[ServerArgs, int, str]]) -> list[str | None]:
    """Rank 0's store (as init_distributed makes it) and check_nodes_agree on one thread per (args, rank) or
    (args, rank, node id; default: one node per --node-rank): None where it passed, else the error."""
    import torch.distributed as dist
    timeout, port = timedelta(seconds=10), free_port()
    out: list[str | None] = [None] * len(node_args)
    stores = []  # rank 0's lives until every thread is done (it would go with its thread, before a late client)

    def one(i: int, args: ServerArgs, rank: int, node_id: str | None = None) -> None:
        try:
            if rank == 0:
                store = _store("127.0.0.1", port, 0, args.tp, timeout)
            else:
                store = dist.TCPStore("127.0.0.1", port, args.tp, is_master=False, timeout=timeout)
            stores.append(store)
            check_nodes_agree(store, args, rank, "gloo", timeout, node_id or f"node {args.node_rank}")
        except SettingError as exc:
            out[i] = str(exc)
        except Exception as exc:  # (a store's timeout: what a refusal replaces)
            out[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i, *entry)) for i, entry in enumerate(node_args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return out


def test_nodes_started_with_other_flags_are_refused_on_every_node() -> None:
    """Node 0 --tp 2 and node 1 --tp 4 (or another page size, or two nodes given one --node-rank) used to wait in
    the process group's start until --dist-timeout (30 min) on both nodes; now each names the difference."""
    node = dict(nnodes=2, dist_init_addr="127.0.0.1:1")
    a0, a1 = ServerArgs(tp=2, node_rank=0, **node), ServerArgs(tp=2, node_rank=1, **node)
    assert _handshake([(a0, 0), (a1, 1)]) == [None, None]
    said = "every node must be started with the same flags, but --tp 4 on node 1, 2 on node 0"
    assert _handshake([(a0, 0), (a1.replace(tp=4), 2), (a1.replace(tp=4), 3)]) == [said] * 3
    said = "every node must be started with the same flags, but --tp 2 on node 1, 4 on node 0"
    assert _handshake([(a0.replace(tp=4), 0), (a0.replace(tp=4), 1), (a1, 1)]) == [said, None, said]  # fewer
    said = "every node must be started with the same flags, but --page-size 4 on node 1, 64 on node 0"
    assert _handshake([(a0, 0), (a1.replace(page_size=4), 1)]) == [said] * 2
    graphs = dict(cuda_graph_bs=(1, 2, 4))  # (a tuple: node 0's comes back from the store as a list)
    assert _handshake([(a0.replace(**graphs), 0), (a1.replace(**graphs), 1)]) == [None, None]
    said = "every node must be started with the same flags, but --cuda-graph-bs [1, 2] on node 1, [1, 2, 4] on node 0"
    assert _handshake([(a0.replace(**graphs), 0), (a1.replace(cuda_graph_bs=(1, 2)), 1)]) == [said] * 2
    b0, b1 = a0.replace(tp=4), a1.replace(tp=4)
    got = _handshake([(b0, 0), (b0, 1), (b1, 2, "A"), (b1, 3, "A"), (b1, 2, "B"), (b1, 3, "B")])
    losers = {i for i in range(2, 6) if got[i] is not None}
    assert losers in ({2, 3}, {4, 5}) and got[1] is None, got  # the ranks of one of them, all of them
    assert all("two nodes were given --node-rank 1" in got[i] for i in losers), got
    assert got[0] is None or "two nodes were given --node-rank 1" in got[0], got


def test_two_nodes_given_one_node_rank_cannot_split_its_ranks() -> None:
    """Node A and node B both started as --node-rank 1 (tp 4: ranks 2 and 3 each), their ranks arriving
    interleaved: A's rank 2, B's rank 3, then A's rank 3 and B's rank 2. Claiming ranks one by one, A won rank 2
    and B rank 3, rank 0 went on into the process group, and each node lost a rank and exited: node 0 waited
    there until --dist-timeout. The node claims its --node-rank: B's ranks are refused, A's pass (rank 0 passes,
    or refuses too when it sees B's refusal before A's last rank: either way no rank of the world is missing)."""
    import torch.distributed as dist
    timeout, port = timedelta(seconds=10), free_port()
    a0, a1 = (ServerArgs(tp=4, nnodes=2, node_rank=n, dist_init_addr="127.0.0.1:1") for n in (0, 1))
    master = _store("127.0.0.1", port, 0, 4, timeout)
    passed: dict[str, str | None] = {}

    def check(name: str, store: object, args: ServerArgs, rank: int, node_id: str) -> None:
        try:
            check_nodes_agree(store, args, rank, "gloo", timeout, node_id)
            passed[name] = None
        except SettingError as exc:
            passed[name] = str(exc)

    rank0 = threading.Thread(target=check, args=("rank 0", master, a0, 0, "node 0"))
    rank0.start()
    for name, args, rank, node_id in (("rank 1", a0, 1, "node 0"), ("A 2", a1, 2, "A"), ("B 3", a1, 3, "B"),
                                      ("A 3", a1, 3, "A"), ("B 2", a1, 2, "B")):
        check(name, dist.TCPStore("127.0.0.1", port, 4, is_master=False, timeout=timeout), args, rank, node_id)
    rank0.join(15)
    assert not rank0.is_alive()
    said = "two nodes were given --node-rank 1"
    assert [passed[name] for name in ("rank 1", "A 2", "A 3")] == [None] * 3, passed
    assert said in passed["B 3"] and said in passed["B 2"], passed
    assert passed["rank 0"] is None or said in passed["rank 0"], passed


def test_a_node_with_other_flags_fails_both_nodes_in_one_line(tiny_ds: str, tmp_path: Path) -> None:
    """Two `dsaserve serve` processes whose --tp differ: both exit 2 within seconds, naming the flag."""
    def serve(*flags: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "dsaserve", "serve", "--model-path", tiny_ds, "--nnodes", "2",
                                 "--dist-init-addr", addr, "--page-size", "4", *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    addr = f"127.0.0.1:{free_port()}"
    node1 = serve("--node-rank", "1", "--tp", "4")
    node0 = serve("--node-rank", "0", "--tp", "2", "--port", str(free_port()))
    try:
        err0, err1 = node0.communicate(timeout=120)[1], node1.communicate(timeout=60)[1]
    finally:
        for proc in (node0, node1):
            proc.kill()
            proc.wait()
    said = "every node must be started with the same flags, but --tp 4 on node 1, 2 on node 0"
    assert node0.returncode == 2 and f"error: rank 0 (DP group 0): {said}" in err0, err0[-3000:]
    assert node1.returncode == 2 and said in err1, err1[-3000:]
    assert "Traceback" not in err0 + err1, (err0 + err1)[-3000:]
