"""PD disaggregation with real processes on loopback: dsaserve prefill and decode servers (real NIXL over
UCX), the real sglang-router in front, the official openai client. Greedy output through the router
equals the aggregated run; injected transfer failures, aborts and a dead peer end requests (never
servers) and every page returns to its pool."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from router_process import RouterProcess, pd_router
from server_process import ServerProcess, cpu_seconds, descendants, free_port, started

pytestmark = pytest.mark.timeout(300)
MAX = 8
GREEDY = SamplingParams(max_tokens=MAX, temperature=0.0, ignore_eos=True)
TIMEOUT_S = 10  # --disaggregation-timeout-s of the servers that lose a peer


def expected(model: str, prompts: list[list[int]], **kw: Any) -> list[list[int]]:
    return [c.token_ids for c in LLM(model, max_total_tokens=2048, **kw).generate(prompts, GREEDY)]


def generate(url: str, ids: list[int], stream: bool = False, **fields: Any) -> httpx.Response:
    body = {"input_ids": ids, "stream": stream, **fields,
            "sampling_params": {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}}
    return httpx.post(f"{url}/generate", json=body, timeout=120)


def stream_ids(r: httpx.Response) -> list[int]:
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["output_ids"]


def pools(url: str) -> list[tuple[int, int]]:
    states = httpx.get(f"{url}/get_server_info", timeout=30).json()["internal_states"]
    return [(s["free_pages"], s["total_pages"]) for s in states]


def wait_pools_whole(url: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(free == total for free, total in pools(url)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{url}: pages did not return to the pool within {within_s} s: {pools(url)}")


def steps(url: str) -> int:
    return sum(s["steps"] for s in httpx.get(f"{url}/get_server_info", timeout=30).json()["internal_states"])


def assert_pairing_refused(prefill_url: str, bootstrap_port: int, decode: ServerProcess, ids: list[int], room: int,
                           named: str, half_named: str) -> None:
    """`decode` (started here) refuses to pair with the prefill server, its 500 naming `named`, and the prefill
    server's half of the room ends with that refusal (naming `half_named`)."""
    with decode, ThreadPoolExecutor(1) as pool:
        prefill_half = pool.submit(generate, prefill_url, ids, bootstrap_room=room)
        r = generate(decode.url, ids, bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port, bootstrap_room=room)
        assert r.status_code == 500 and named in r.text, r.text
        half = prefill_half.result(timeout=100)
        assert "the decode server refused it" in half.text and half_named in half.text, half.text


def pd_servers(model: str, tmp: Path, prefill: dict[str, Any], decode: dict[str, Any],
               prefill_env: dict[str, str] | None = None) -> tuple[ServerProcess, ServerProcess, int]:
    port = free_port()
    common = dict(max_total_tokens=2048)
    # Rank rendezvous ports from this process's sequence too: one a server drew itself could be the other's
    # bootstrap port before that is bound.
    prefill, decode = ({"dist_init_addr": f"127.0.0.1:{free_port()}", **f} if int(f.get("tp", 1)) > 1 else f
                       for f in (prefill, decode))
    p = ServerProcess(model, tmp / "prefill.log", env=prefill_env, disaggregation_mode="prefill",
                      disaggregation_bootstrap_port=port, **common, **prefill)
    d = ServerProcess(model, tmp / "decode.log", disaggregation_mode="decode", **common, **decode)
    return p, d, port


# -- prefill --tp 2, decode --tp 2 (attention TP 2: the leader receives, its group copies), page 64 ----

PROMPTS_64 = prompts_ids(4, [63, 64, 65, 5], seed=3)  # one before, at and one after a page boundary


@pytest.fixture(scope="class")
def mixed_tp(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("pd-tp")
    flags = dict(page_size=64, disaggregation_timeout_s=TIMEOUT_S)
    p, d, port = pd_servers(tiny_ds, tmp, dict(tp=2, **flags), dict(tp=2, **flags))
    with started(p, d), pd_router(tmp / "router.log", p, port, d) as router:
        yield p, d, router


class TestMixedTP:
    def test_idle_servers_do_not_spin(self, mixed_tp: tuple) -> None:
        """Idle prefill and decode servers block (no NIXL progress thread polling at full speed: the
        engine drives transfers while one is in flight); CPU time, not wall time."""
        p, d, _ = mixed_tp
        pids = [pid for server in (p, d) for pid in (server.proc.pid, *descendants(server.proc.pid))]
        before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(2.0)
        used = {pid: (cpu_seconds(pid) - before[pid]) / 2.0 for pid in pids}
        assert all(u < 0.1 for u in used.values()), f"idle processes used CPU (share of a core): {used}"

    def test_the_routers_grpc_probes_log_no_warning(self, mixed_tp: tuple) -> None:
        """sglang-router probed each server for gRPC as it added it (before it was ready): uvicorn logged each
        probe as an "Invalid HTTP request" WARNING (four per server)."""
        p, d, _ = mixed_tp
        assert all("Invalid HTTP request" not in server.log() for server in (p, d))

    def test_generate_equals_aggregated(self, mixed_tp: tuple, tiny_ds: str) -> None:
        p, d, router = mixed_tp
        want = expected(tiny_ds, PROMPTS_64, page_size=64)
        before = steps(p.url)
        got = [generate(router.url, ids).json()["output_ids"] for ids in PROMPTS_64]
        assert got == want
        assert steps(p.url) - before == len(PROMPTS_64)  # the prefill server ran each prompt, decoded nothing
        assert [stream_ids(generate(router.url, ids, stream=True)) for ids in PROMPTS_64[:2]] == want[:2]
        assert all(free == total for free, total in pools(p.url) + pools(d.url))

    def test_openai_client_through_router(self, mixed_tp: tuple, model: str) -> None:
        """The official client through the router (it takes text prompts) equals the decode server alone."""
        p, d, router = mixed_tp
        asyncio.run(self._openai(router.url, d.url, model))

    @staticmethod
    async def _openai(router: str, aggregated: str, model: str) -> None:
        via = openai.AsyncOpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=120)
        ref = openai.AsyncOpenAI(base_url=f"{aggregated}/v1", api_key="unused", max_retries=0, timeout=120)
        extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
        try:
            for prompt in ("Hello there", "The quick brown fox jumps over the lazy dog " * 6):
                args = dict(model=model, prompt=prompt, max_tokens=MAX, temperature=0, logprobs=0, extra_body=extra)
                r, alone = await via.completions.create(**args), await ref.completions.create(**args)
                assert r.choices[0].logprobs.tokens == alone.choices[0].logprobs.tokens
                assert len(r.choices[0].logprobs.tokens) == MAX
                chunks = await via.completions.create(**{**args, "logprobs": None}, stream=True)
                text = "".join([c.choices[0].text async for c in chunks if c.choices])
                assert text == alone.choices[0].text
            chat = dict(model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=MAX,
                        temperature=0, extra_body={"ignore_eos": True})
            alone = await ref.chat.completions.create(**chat)
            stream = await via.chat.completions.create(**chat, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == alone.choices[0].message.content and text
        finally:
            await via.close()
            await ref.close()

    def test_bad_bootstrap_fields_and_prompt_logprobs(self, mixed_tp: tuple, model: str) -> None:
        """The decode server names a bad bootstrap host or port (a 400, not a 500 with a traceback) and refuses
        echo with logprobs (it never runs the prompt: the prefill server does); through the router, /generate's prompt
        log-probabilities are the aggregated run's (the decode server reports an empty list, which the router fills
        with the prefill server's; it used to report a wrong one) and so are the completion's."""
        p, d, router = mixed_tp
        bootstrap = int(p.cmd[p.cmd.index("--disaggregation-bootstrap-port") + 1])
        room = dict(bootstrap_room=7, bootstrap_host="127.0.0.1", bootstrap_port=bootstrap)
        for field, value, says in (("bootstrap_host", "not a host!!", "cannot connect to the bootstrap server"),
                                   ("bootstrap_port", 70000, "bootstrap_port must be a TCP port")):
            r = generate(d.url, PROMPTS_64[3], **{**room, field: value})
            assert r.status_code == 400 and says in r.text, r.text
        body = dict(model=model, prompt=PROMPTS_64[3], max_tokens=1, logprobs=1, echo=True, **room)
        r = httpx.post(f"{d.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "echo with logprobs" in r.text, r.text
        fields = dict(return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
        alone = generate(d.url, PROMPTS_64[3], **fields).json()["meta_info"]
        via = generate(router.url, PROMPTS_64[3], **fields).json()["meta_info"]
        assert [[pytest.approx(lp), t, x] for lp, t, x in via["input_token_logprobs"]] == alone["input_token_logprobs"]
        assert [[pytest.approx(lp, rel=1e-6), t, x] for lp, t, x in via["output_token_logprobs"]] == \
            alone["output_token_logprobs"]  # (the first token's crosses from the prefill server)
        wait_pools_whole(d.url, 30)

    def test_a_decode_refusal_ends_the_prefill_half(self, mixed_tp: tuple, model: str) -> None:
        """A request the decode server refuses, before its route is known (a model it does not serve), before its
        engine takes it (echo with logprobs) or in its engine (too long for its pool), also ends the prefill
        server's half of the room, which waited for page ids until its timeout; it names the refusal."""
        p, d, _ = mixed_tp
        bootstrap = int(p.cmd[p.cmd.index("--disaggregation-bootstrap-port") + 1])
        cases = (  # (room, path on the decode server, its body, its status, what both answers name)
            (76, "/v1/completions", dict(model="no-such-model", prompt=PROMPTS_64[3], max_tokens=1), 404,
             "does not exist"),
            (77, "/v1/completions", dict(model=model, prompt=PROMPTS_64[3], max_tokens=1, logprobs=1, echo=True),
             400, "echo with logprobs"),
            # prompt + max_new_tokens fit the context (4096), not the decode server's pool (2048); the prefill
            # server, which holds only the prompt and the first token, accepts the same request
            (78, "/generate", dict(input_ids=PROMPTS_64[3], sampling_params={"max_new_tokens": 3000,
                                                                              "ignore_eos": True}), 400, "KV pool"))
        for room, path, body, status, says in cases:
            half_body = {"input_ids": PROMPTS_64[3], "bootstrap_room": room,
                         "sampling_params": body.get("sampling_params", {"max_new_tokens": 1})}
            refused, half = asyncio.run(self._refused_pair(
                p.url, half_body, f"{d.url}{path}",
                {**body, "bootstrap_room": room, "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap}))
            assert refused.status_code == status and says in refused.text, refused.text
            assert "the decode server" in half.text and says in half.text, half.text
        wait_pools_whole(p.url, 30)

    def test_a_prefill_refusal_is_the_decode_halfs_answer(self, mixed_tp: tuple, model: str) -> None:
        """A request the prefill server refuses (a model it does not serve, a bad sampling value) ends the decode
        server's half with the refusal's status and words, not a 500 (which sglang-router retries, and whose
        repeats open its circuit breaker: every later request got 503 `No available prefill workers`)."""
        p, d, _ = mixed_tp
        bootstrap = int(p.cmd[p.cmd.index("--disaggregation-bootstrap-port") + 1])
        cases = (  # (room, the prefill server's half, its status, what both answers name)
            (86, ("/v1/completions", dict(model="no-such-model", prompt=PROMPTS_64[3], max_tokens=1)), 404,
             "does not exist"),
            (87, ("/generate", dict(input_ids=PROMPTS_64[3], sampling_params={"max_new_tokens": 1,
                                                                              "temperature": -1.0})), 400,
             "temperature"))
        for room, (path, half_body), status, says in cases:
            body = dict(model=model, prompt=PROMPTS_64[3], max_tokens=1, bootstrap_room=room,
                        bootstrap_host="127.0.0.1", bootstrap_port=bootstrap)
            with ThreadPoolExecutor(1) as pool:
                half = pool.submit(httpx.post, f"{p.url}{path}", json={**half_body, "bootstrap_room": room},
                                   timeout=120)
                answer = httpx.post(f"{d.url}/v1/completions", json=body, timeout=120)
                assert half.result().status_code == status and says in half.result().text, half.result().text
            assert answer.status_code == status, answer.text
            assert "the prefill server refused it" in answer.text and says in answer.text, answer.text
            assert answer.json()["error"]["code"] == half.result().json()["error"]["code"], answer.text
            assert status != 404 or answer.json()["error"]["code"] == "model_not_found", answer.text
        wait_pools_whole(d.url, 30)
        wait_pools_whole(p.url, 30)

    @staticmethod
    async def _refused_pair(prefill: str, half_body: dict, refused_url: str,
                            refused_body: dict) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            half = asyncio.create_task(client.post(f"{prefill}/generate", json=half_body))
            await asyncio.sleep(0.5)  # (either order ends it: a refusal first ends the room for its request,
            # and the prefill server's refusal of it names the decode server's)
            refused = await client.post(refused_url, json=refused_body)
            return refused, await half

    def test_seeded_generate_through_the_router_equals_aggregated(self, mixed_tp: tuple) -> None:
        """sglang-router forwards SGLang's sampling_params.sampling_seed and drops `seed`: /generate takes
        sampling_seed, and a seeded request through the router samples the aggregated run's tokens. (sampling_seed
        was a 400, and `seed` through the router sampled unseeded: a PD soak's seeded /generate requests differed
        from the aggregated server's from their first token.)"""
        p, d, router = mixed_tp
        ids = PROMPTS_64[3]

        def sampled(url: str, **seed: int) -> list[int]:
            r = httpx.post(f"{url}/generate", timeout=120, json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": MAX, "temperature": 0.9, "top_p": 0.9, "ignore_eos": True, **seed}})
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]

        alone = sampled(d.url, seed=1234)
        assert sampled(d.url, sampling_seed=1234) == alone
        assert [sampled(router.url, sampling_seed=1234) for _ in range(2)] == [alone, alone]
        r = httpx.post(f"{d.url}/generate", timeout=60, json={"input_ids": ids, "sampling_params": {
            "max_new_tokens": 1, "seed": 1, "sampling_seed": 2}})
        assert r.status_code == 400 and "sampling_seed" in r.text, r.text

    def test_chat_with_n_above_1_is_refused_by_name(self, mixed_tp: tuple, model: str) -> None:
        """sglang-router sends a chat request with n > 1 with one bootstrap room per choice (lists): both servers
        answer the 400 that names n, as for completions (it was a 400 about the bootstrap fields' types)."""
        p, d, router = mixed_tp
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        chat = dict(model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=2, n=3)
        with pytest.raises(openai.BadRequestError, match="n > 1"):
            client.chat.completions.create(**chat)
        # (streamed, the router passes the error on as one event the openai client cannot parse)
        r = httpx.post(f"{router.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60)
        assert r.status_code == 400 and "n > 1" in r.text and "bootstrap" not in r.text, r.text
        wait_pools_whole(p.url, 30)
        wait_pools_whole(d.url, 30)

    def test_a_decode_server_with_another_kv_cache_dtype_is_refused_at_connect(self, mixed_tp: tuple, tiny_ds: str,
                                                                             tmp_path: Path) -> None:
        """A decode server whose KV cache rows differ (--kv-cache-dtype) refuses the prefill server when it looks it
        up, naming the flag, and the prefill server's half ends with that refusal without running the prompt. (It
        preallocated pages, the prefill server ran the prompt, and the write failed on 'the KV cache layouts
        differ ... (same model, dtype and page size on both sides?)', which does not name the flag.)"""
        p, _, _ = mixed_tp
        bootstrap = int(p.cmd[p.cmd.index("--disaggregation-bootstrap-port") + 1])
        fp8 = ServerProcess(tiny_ds, tmp_path / "fp8.log", disaggregation_mode="decode", page_size=64,
                            kv_cache_dtype="fp8_e4m3", max_total_tokens=2048)
        before = steps(p.url)
        assert_pairing_refused(p.url, bootstrap, fp8, PROMPTS_64[3], 12346, "--kv-cache-dtype", "--kv-cache-dtype")
        assert steps(p.url) == before  # refused before the prefill server ran the prompt
        wait_pools_whole(p.url, 30)

    def test_decode_killed_prefill_frees_pages(self, mixed_tp: tuple) -> None:
        p, d, router = mixed_tp

        async def flood() -> list[Any]:
            async with httpx.AsyncClient(timeout=3 * TIMEOUT_S) as client:
                body = {"input_ids": PROMPTS_64[2], "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}}
                jobs = [client.post(f"{router.url}/generate", json=body) for _ in range(6)]
                kill = asyncio.create_task(asyncio.to_thread(self._kill_when_busy, d))
                results = await asyncio.gather(*jobs, return_exceptions=True)
                await kill
                return results

        asyncio.run(flood())
        assert d.proc.poll() is not None
        wait_pools_whole(p.url, 4 * TIMEOUT_S)  # the prefill server's held pages came back
        assert httpx.get(f"{p.url}/health_generate", timeout=60).status_code == 200

    @staticmethod
    def _kill_when_busy(d: ServerProcess) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and all(f == t for f, t in pools(d.url)):
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)


# -- MTP speculation, page size 1, partial DP attention on the decode side (2 groups of attention TP 2), GLM-5 --

class TestSpecDPAttention:
    def test_generate_equals_aggregated(self, tiny_models: dict[str, str], tmp_path: Path) -> None:
        model = tiny_models["glm_moe_dsa"]
        spec = dict(page_size=1, speculative_algorithm="NEXTN", speculative_num_steps=2)
        prompts = prompts_ids(4, [15, 16, 17, 3], seed=5)  # around index_topk (16)
        p, d, port = pd_servers(model, tmp_path, spec, dict(tp=4, dp=2, enable_dp_attention=True, **spec))
        with started(p, d), pd_router(tmp_path / "router.log", p, port, d) as router:
            want = expected(model, prompts, page_size=1)
            before = steps(p.url)
            assert [generate(router.url, ids).json()["output_ids"] for ids in prompts] == want
            assert steps(p.url) - before == len(prompts)  # prompts only: the decode server decoded them
            assert [stream_ids(generate(router.url, ids, stream=True)) for ids in prompts[:2]] == want[:2]
            # a decode server without speculation refuses to pair, naming the setting, and the prefill server's
            # half of the room ends with that refusal (it used to wait out its timeout)
            spec_mismatch = ServerProcess(model, tmp_path / "nospec.log", disaggregation_mode="decode", page_size=1,
                                          max_total_tokens=2048)
            assert_pairing_refused(p.url, port, spec_mismatch, prompts[0], 12345, "speculative draft steps",
                                   "speculative")


# -- failures end requests, not servers ---------------------------------------------------------------

@pytest.fixture(scope="class")
def failing(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("pd-fail")
    flags = dict(page_size=1, disaggregation_timeout_s=TIMEOUT_S)
    prefill = dict(tp=2, dp=2, enable_dp_attention=True, **flags)  # rooms go to prefill DP group room % 2
    p, d, port = pd_servers(tiny_ds, tmp, prefill, flags, prefill_env={"DSASERVE_DISAGG_TEST_FAILURE_PROB": "0.05"})
    # the router would retry a failed request (with a new room): without retries the client sees the error
    with started(p, d), pd_router(tmp / "router.log", p, port, d, "--disable-retries") as router:
        yield p, d, router, port


class TestFailures:
    def test_injected_failures_end_requests(self, failing: tuple) -> None:
        p, d, router, _ = failing
        prompts = prompts_ids(60, [3 + i % 13 for i in range(60)], seed=9)

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{router.url}/generate", json={
                    "input_ids": ids, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
                    for ids in prompts))

        results = asyncio.run(run())
        ok = [r for r in results if r.status_code == 200]
        failed = [r for r in results if r.status_code != 200]
        assert all(len(r.json()["output_ids"]) == 4 for r in ok)
        assert all("injected transfer failure" in r.text for r in failed), [r.text for r in failed][:3]
        # p = 0.05, --seed 0: the two prefill leaders draw from Random(0) and Random(1), whose first 60 draws
        # fail at [35, 40] and [9, 13, 19, 20, 26, 35, 56]: 4 to 7 failures however the rooms split
        assert len(ok) + len(failed) == 60 and 1 <= len(failed) <= 8
        for url in (p.url, d.url):
            wait_pools_whole(url, 2 * TIMEOUT_S)
            assert httpx.get(f"{url}/health_generate", timeout=60).status_code == 200

    def test_abort_while_waiting_for_the_cache(self, failing: tuple) -> None:
        p, d, _, port = failing
        ids = prompts_ids(1, [9], seed=4)[0]
        for server, room in ((d, 77001), (p, 77002)):  # decode: pre-allocated; prefill: waits for a decode server
            def held() -> bool:  # decode: the request holds its pages; prefill: it waits (holding none)
                states = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["internal_states"]
                return any(s["free_pages"] < s["total_pages"] if server is d else s["waiting"] for s in states)

            async def run() -> tuple[httpx.Response, httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    job = asyncio.create_task(client.post(f"{server.url}/generate", json={
                        "input_ids": ids, "rid": f"abort-{room}", "bootstrap_host": "127.0.0.1",
                        "bootstrap_port": port, "bootstrap_room": room, "sampling_params": {"max_new_tokens": 4}}))
                    deadline = time.monotonic() + 30
                    while not await asyncio.to_thread(held) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    abort = await client.post(f"{server.url}/abort_request", json={"rid": f"abort-{room}"})
                    return await job, abort

            answer, abort = asyncio.run(run())
            assert abort.status_code == 200
            assert answer.status_code == 200 and answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
            wait_pools_whole(server.url, 2 * TIMEOUT_S)

    def test_routed_dp_rank_must_be_the_rooms_group(self, failing: tuple) -> None:
        """A room belongs to prefill DP group room % dp, where the decode server asks for it: a routed_dp_rank
        that names another group is refused at once (it ran there and waited out the timeout), and the decode
        half of the room, holding its pages, ends with that refusal and its 400 (it waited out its own timeout)."""
        p, d, port = failing[0], failing[1], failing[3]
        room = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 99001}

        async def run() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                half = asyncio.create_task(client.post(f"{d.url}/generate", json={
                    "input_ids": [5, 6, 7], **room, "sampling_params": {"max_new_tokens": 2}}))
                deadline = time.monotonic() + 30  # the decode half holds its pages (and sent their ids)
                while all(f == t for f, t in pools(d.url)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                refused = await client.post(f"{p.url}/generate", json={
                    "input_ids": [5, 6, 7], **room, "routed_dp_rank": 0, "sampling_params": {"max_new_tokens": 2}})
                return refused, await half

        refused, half = asyncio.run(run())
        assert refused.status_code == 400 and "DP group 1" in refused.text and "routed_dp_rank" in refused.text, \
            refused.text
        assert half.status_code == 400 and "the prefill server refused it" in half.text \
            and "routed_dp_rank" in half.text, half.text  # (the refusal's status: a 500 the router would retry)
        wait_pools_whole(d.url, 2 * TIMEOUT_S)

    def test_prefill_killed_decode_requests_fail(self, failing: tuple) -> None:
        """Decode requests whose KV cache never comes end within the timeout with a clear error, the
        decode pool returns whole and the server keeps serving, also once the prefill server is dead.
        (The requests go to the decode server only, so this is the path of a prefill side that never
        answers; a prefill server killed in the middle of a write is not reproduced deterministically.)"""
        p, d, _, port = failing
        prompts = prompts_ids(3, [5, 6, 7], seed=8)

        async def run() -> list[httpx.Response]:  # sent to the decode server only: they wait on the prefill server
            async with httpx.AsyncClient(timeout=120) as client:
                jobs = [asyncio.create_task(client.post(f"{d.url}/generate", json={
                    "input_ids": ids, "bootstrap_host": "127.0.0.1", "bootstrap_port": port,
                    "bootstrap_room": 88000 + i, "sampling_params": {"max_new_tokens": 4}}))
                    for i, ids in enumerate(prompts)]
                deadline = time.monotonic() + 30
                while all(f == t for f, t in pools(d.url)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                p.proc.send_signal(signal.SIGKILL)
                return await asyncio.gather(*jobs)

        start = time.monotonic()
        results = asyncio.run(run())
        assert time.monotonic() - start < 3 * TIMEOUT_S
        assert all(r.status_code == 500 and "no KV cache from the prefill server" in r.text for r in results)
        wait_pools_whole(d.url, 2 * TIMEOUT_S)
        assert httpx.get(f"{d.url}/health_generate", timeout=60).status_code == 200


def test_a_restarted_prefill_server_pairs_at_once(tiny_ds: str, tmp_path: Path) -> None:
    """A prefill server restarted on the same bootstrap port binds new control ports: the decode server looks them
    up for every request. (It cached them for 10 s: requests right after a restart sent their page ids to the dead
    ports, and both halves failed at their timeouts.)"""
    flags = dict(page_size=4, disaggregation_timeout_s=TIMEOUT_S)
    p, d, port = pd_servers(tiny_ds, tmp_path, flags, flags)
    ids = PROMPTS_64[3]
    want = expected(tiny_ds, [ids], page_size=4)[0]
    with ThreadPoolExecutor(1) as pool, started(p, d):
        for room in (900, 901):
            if room == 901:
                p.stop()
                p.start()
            start = time.monotonic()
            prefill_half = pool.submit(generate, p.url, ids, bootstrap_room=room)
            r = generate(d.url, ids, bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=room)
            assert r.status_code == 200 and r.json()["output_ids"] == want, r.text
            assert prefill_half.result(timeout=60).status_code == 200
            assert time.monotonic() - start < TIMEOUT_S  # (not after a timeout)


def test_worker_urls_routing(tiny_ds: str, tmp_path: Path) -> None:
    """Plain sglang-router load balancing over two aggregated dsaserve servers."""
    prompts = prompts_ids(4, [5, 9, 13, 17], seed=12)
    want = expected(tiny_ds, prompts, page_size=64)
    a = ServerProcess(tiny_ds, tmp_path / "a.log", max_total_tokens=2048)
    b = ServerProcess(tiny_ds, tmp_path / "b.log", max_total_tokens=2048)
    with started(a, b), RouterProcess(tmp_path / "router.log", "--worker-urls", a.url, b.url) as router:
        assert [generate(router.url, ids).json()["output_ids"] for ids in prompts] == want
        steps = [httpx.get(f"{s.url}/get_server_info", timeout=30).json()["internal_states"][0]["steps"] for s in (a, b)]
        assert min(steps) > 0  # round robin: both servers served
        # the router reads each server's /get_load (SGLang's; its load-aware policies use it): idle, 0 (-1: unread)
        loads = httpx.get(f"{router.url}/get_loads", timeout=30).json()["workers"]
        assert sorted((w["worker"], w["load"]) for w in loads) == sorted([(a.url, 0), (b.url, 0)])
        # a chat naming no model reaches the servers as model "unknown": served (it was a 404)
        chat = httpx.post(f"{router.url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 2, chat.text


@pytest.mark.gpu
def test_gpu_prefill_on_gpu0_decode_on_gpu1(tiny_ds: str, tmp_path: Path) -> None:
    """NIXL moving CUDA memory: prefill on GPU 0, decode on GPU 1, through the router; the decode server
    serving the same prompts whole (its own prefill) is the reference."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    port = free_port()
    flags = dict(max_total_tokens=4096, page_size=64, dtype="float32")
    p = ServerProcess(tiny_ds, tmp_path / "prefill.log", env={"CUDA_VISIBLE_DEVICES": "0"},
                      disaggregation_mode="prefill", disaggregation_bootstrap_port=port, **flags)
    d = ServerProcess(tiny_ds, tmp_path / "decode.log", env={"CUDA_VISIBLE_DEVICES": "1"},
                      disaggregation_mode="decode", **flags)
    with started(p, d), pd_router(tmp_path / "router.log", p, port, d) as router:
        for ids in PROMPTS_64:
            assert generate(router.url, ids).json()["output_ids"] == generate(d.url, ids).json()["output_ids"]
        assert all(free == total for free, total in pools(p.url) + pools(d.url))
