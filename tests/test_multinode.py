"""Two nodes on one machine (`--nnodes 2 --node-rank 0|1 --dist-init-addr 127.0.0.1:PORT`, two
`dsaserve serve` processes): greedy tokens equal the single-device run; node 1 ends with node 0."""
from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
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
