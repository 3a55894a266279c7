"""`dsaserve bench serving`: load an OpenAI-compatible server with random token-id prompts.

Streams /v1/completions (a list-of-int prompt, ignore_eos, greedy unless --extra-request-body says
otherwise) and reports request and token
throughput, TTFT, TPOT and ITL (mean, median, p99) as a table and as JSON, with this run's MTP accept
length and prefix-cache hit rate where the server reports them (/get_server_info): the same seed draws
the same prompts, so a second run on one server finds them cached and measures a lighter load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import httpx
from tqdm import tqdm

from dsaserve import event_loop
from dsaserve.bench.serving_report import compute_metrics, format_table
from dsaserve.router_flags import http_url_problem

FALLBACK_VOCAB = 1000  # when the server does not say (only dsaserve / sglang expose it)
PROBE_TIMEOUT_S = 30.0  # the first GET of a server: one that accepts and never answers is no server


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:30000"
    model: str | None = None
    api_key: str | None = None
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 1.0
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    vocab_size: int | None = None
    output_json: str | None = None
    disable_tqdm: bool = False
    num_clients: int | None = None  # client processes; None: one per CLIENT_SHARE concurrent requests
    extra_request_body: dict[str, Any] = field(default_factory=dict)  # merged into every request (SGLang's flag)


CLIENT_SHARE = 16  # concurrent streams per client process: one Python process parses ~10K SSE events/s


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--base-url", default=d.base_url, help="server address (with or without /v1)")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None)
    # SGLang's bench_serving names (--random-*) are accepted too: the prompts are random token ids either way.
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=d.input_len,
                        help="prompt tokens per request")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=d.output_len,
                        help="tokens to generate per request")
    parser.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float,
                        default=d.range_ratio, help="lengths are uniform in [len * ratio, len] (1.0: fixed)")
    parser.add_argument("--dataset-name", choices=["random"], default="random",
                        help="random token-id prompts (the only dataset: no network, no files)")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts)
    parser.add_argument("--request-rate", type=float, default=d.request_rate,
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--vocab-size", type=int, default=None, help="token ids are drawn below this "
                        "(default: the server's /get_model_info, else 1000)")
    parser.add_argument("--output-json", default=None, help="write the metrics here")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--extra-request-body", type=_json_object, default={}, metavar="JSON",
                        help='fields merged into every request, e.g. \'{"temperature": 0.6, "top_p": 0.95}\'')
    parser.add_argument("--num-clients", type=int, default=None,
                        help=f"client processes sharing the requests and the concurrency (default: one per "
                             f"{CLIENT_SHARE} concurrent requests, at most half the CPUs), so that parsing the "
                             f"streams does not delay the timestamps")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def config_from_cli(ns: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{k: getattr(ns, k) for k in BenchConfig.__dataclass_fields__ if hasattr(ns, k)})


def config_problems(cfg: BenchConfig) -> list[str]:
    """Flags that could only end in a traceback, each named: checked before any connection."""
    sizes = {"--input-len": cfg.input_len, "--output-len": cfg.output_len, "--num-prompts": cfg.num_prompts,
             "--max-concurrency": cfg.max_concurrency, "--num-clients": cfg.num_clients,
             "--vocab-size": cfg.vocab_size}
    problems = [f"{flag} must be >= 1, got {value}" for flag, value in sizes.items() if value is not None and value < 1]
    if not cfg.request_rate > 0:  # nan too; inf is valid: every request at once
        problems.append(f"--request-rate must be > 0 requests per second (inf: all at once), got {cfg.request_rate}")
    if not 0 <= cfg.range_ratio <= 1:
        problems.append(f"--range-ratio must be in [0, 1], got {cfg.range_ratio}")
    url = http_url_problem("--base-url", cfg.base_url)
    return problems + ([url] if url else [])


class NoServer(Exception):
    """No server at --base-url that the benchmark could use (none answered, or it refused to list its models)."""


def make_requests(cfg: BenchConfig, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; the same for the same seed."""
    rng = random.Random(cfg.seed)
    lo_tok = min(10, vocab - 1)  # skip the first ids: tiny and real tokenizers put specials there

    def length(n: int) -> int:
        return max(1, rng.randint(max(1, int(n * cfg.range_ratio)), n))

    return [([rng.randrange(lo_tok, vocab) for _ in range(length(cfg.input_len))], length(cfg.output_len))
            for _ in range(cfg.num_prompts)]


async def _discover(client: httpx.AsyncClient, cfg: BenchConfig) -> tuple[str, int]:
    try:  # asked even with --model: it shows that a usable server listens there (one that answers nothing fails
        # at the probe's timeout, not at the requests' 600 s)
        r = await client.get("/v1/models", timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise NoServer(f"could not reach the server at {cfg.base_url}: {str(exc) or type(exc).__name__}") from None
    # refused (401 for a wrong --api-key: every request would fail the same way), or no model list to pick from
    if r.status_code in (401, 403) or (not r.is_success and cfg.model is None):
        raise NoServer(f"the server at {cfg.base_url} answered GET /v1/models with {r.status_code}: {r.text[:200]}")
    model = cfg.model
    if model is None:
        try:
            model = r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise NoServer(f"the server at {cfg.base_url} lists no model at /v1/models: {r.text[:200]}") from None
    vocab = cfg.vocab_size
    if vocab is None:
        try:
            r = await client.get("/get_model_info")
            vocab = int(r.json()["vocab_size"]) if r.status_code == 200 else FALLBACK_VOCAB
        except (httpx.HTTPError, KeyError, ValueError):
            vocab = FALLBACK_VOCAB
    return model, vocab


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], out_len: int,
               extra: dict[str, Any]) -> RequestResult:
    """One streamed request. Each chunk's running usage (continuous_usage_stats) says how many tokens it holds:
    a gap before a chunk of n tokens (MTP verifies several per step) counts as n gaps of gap / n, as SGLang's
    bench_serving counts them, so ITL is per token like TPOT. A request counts only if it ends with stop or
    length and reports its usage."""
    res = RequestResult(prompt_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "ignore_eos": True,
            **extra, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    start = last = time.perf_counter()
    seen, finish = 0, None  # tokens in the chunks so far; the finish reason
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                usage = chunk.get("usage")
                if chunk.get("choices"):
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    tokens = usage["completion_tokens"] - seen if usage else 1
                    if tokens > 0:
                        if res.ttft == 0.0:
                            res.ttft = now - start
                        else:
                            res.itl += [(now - last) / tokens] * tokens
                        seen, last = seen + tokens, now
                if usage:
                    res.output_tokens, res.prompt_len = usage["completion_tokens"], usage["prompt_tokens"]
        res.latency = time.perf_counter() - start
        if finish not in ("stop", "length") or not res.output_tokens:
            res.error = f"the stream ended with finish_reason {finish!r}" if finish not in ("stop", "length") \
                else "the stream reported no usage (completion_tokens)"
            return res
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def client_processes(cfg: BenchConfig) -> int:
    """How many client processes share the load: never more than the requests or the concurrency."""
    streams = min(cfg.max_concurrency or cfg.num_prompts, cfg.num_prompts)
    wanted = cfg.num_clients if cfg.num_clients is not None else min(math.ceil(streams / CLIENT_SHARE),
                                                                       (os.cpu_count() or 2) // 2)
    return max(1, min(wanted, streams))


def _drive_in_processes(cfg: BenchConfig, model: str, reqs: list[tuple[list[int], int]],
                        n: int) -> tuple[list[RequestResult], float]:
    """n client processes, each with its share of the concurrency and of the request rate (merged Poisson
    arrivals stay Poisson), take the requests from one shared queue as their slots free (dealt out in advance, a
    client whose requests ended early left its slots idle). They start together after their imports (a barrier);
    perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine, so the duration runs from the
    first start to the last end. Progress is counted here, from their completions."""
    conc = cfg.max_concurrency
    parts = [replace(cfg, max_concurrency=None if conc is None else conc // n + (i < conc % n),
                     request_rate=cfg.request_rate / n, seed=cfg.seed + 1000 * i, disable_tqdm=True) for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(n, mp_context=ctx) as pool:
        start, finished, todo = manager.Barrier(n), manager.Queue(), manager.Queue()
        for i in range(len(reqs)):
            todo.put(i)
        futures = [pool.submit(_client_process, c, model, reqs, todo, start, finished) for c in parts]
        with tqdm(total=len(reqs), disable=cfg.disable_tqdm, desc="requests") as bar:
            while not all(f.done() for f in futures) or not finished.empty():
                try:
                    bar.update(finished.get(timeout=0.2))
                except queue.Empty:
                    pass
        done = [f.result() for f in futures]  # a client that failed (not a request) raises here
    results: list[RequestResult] = [RequestResult()] * len(reqs)
    for taken, _, _ in done:  # back to the requests' order
        for i, result in taken:
            results[i] = result
    return results, max(end for _, _, end in done) - min(begin for _, begin, _ in done)


def _client_process(cfg: BenchConfig, model: str, reqs: list[tuple[list[int], int]], todo: Any, start: Any,
                    finished: Any) -> tuple[list[tuple[int, RequestResult]], float, float]:
    def pull() -> int | None:
        try:
            return todo.get_nowait()
        except queue.Empty:
            return None

    async def take() -> int | None:
        return await asyncio.to_thread(pull)

    async def go() -> tuple[list[tuple[int, RequestResult]], float, float]:
        async with _client(cfg) as client:
            start.wait(300)  # every client imported and connected-ready: begin together
            results, duration = await _drive(cfg, client, model, reqs, take, on_done=lambda: finished.put(1))
        end = time.perf_counter()
        return results, end - duration, end
    return event_loop.run(go())


def _client(cfg: BenchConfig) -> httpx.AsyncClient:
    base = cfg.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or 1000)
    # (a connection that cannot be made fails in 10 s, not after the 600 s a long request may take)
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0), limits=limits)


async def _drive(cfg: BenchConfig, client: httpx.AsyncClient, model: str, reqs: list[tuple[list[int], int]],
                 take: Callable[[], Awaitable[int | None]], on_done: Callable[[], object] | None = None,
                 ) -> tuple[list[tuple[int, RequestResult]], float]:
    """Run the requests `take` hands out (their indices; None: no more), each once a concurrency slot is free,
    at Poisson arrivals when a request rate is set. Returns (index, result) pairs and the duration."""
    rng = random.Random(cfg.seed + 1)
    limit = asyncio.Semaphore(cfg.max_concurrency or len(reqs) or 1)
    bar = tqdm(total=len(reqs), disable=cfg.disable_tqdm, desc="requests")

    async def run(i: int) -> tuple[int, RequestResult]:
        try:
            result = await _one(client, model, *reqs[i], cfg.extra_request_body)
        finally:
            limit.release()
        bar.update(1)
        if on_done is not None:
            on_done()
        return i, result

    start = arrival = time.perf_counter()
    tasks = []
    while True:
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))  # Poisson arrivals, kept however slots wait
        await limit.acquire()  # then a free slot: a request is taken only when it can start
        if (i := await take()) is None:
            break
        tasks.append(asyncio.create_task(run(i)))
        if math.isfinite(cfg.request_rate):
            arrival += rng.expovariate(cfg.request_rate)
    results = list(await asyncio.gather(*tasks))
    bar.close()
    return results, time.perf_counter() - start


async def benchmark(cfg: BenchConfig) -> dict[str, Any]:
    n = client_processes(cfg)
    cfg = replace(cfg, num_clients=n)  # the JSON records how many ran
    async with _client(cfg) as client:
        model, vocab = await _discover(client, cfg)
        before = await _server_totals(client)
        reqs = make_requests(cfg, vocab)
        if n == 1:
            order = iter(range(len(reqs)))

            async def take() -> int | None:
                return next(order, None)
            taken, duration = await _drive(cfg, client, model, reqs, take)
            results = [result for _, result in sorted(taken, key=lambda pair: pair[0])]
        else:
            results, duration = await asyncio.to_thread(_drive_in_processes, cfg, model, reqs, n)
        after = await _server_totals(client)
    metrics = compute_metrics(cfg, results, duration)
    run = {k: after[k] - before[k] for k in COUNTERS}  # this run's, all DP ranks
    verifies, queried = run["spec_verify_steps"], run["prefix_queried_tokens"]
    metrics["accept_length"] = (run["spec_accepted_tokens"] + verifies) / verifies if verifies else None
    metrics["prefix_hit_rate"] = run["prefix_hit_tokens"] / queried if queried else None
    return metrics


COUNTERS = ("spec_verify_steps", "spec_accepted_tokens", "prefix_hit_tokens", "prefix_queried_tokens")


async def _server_totals(client: httpx.AsyncClient) -> dict[str, int]:
    """COUNTERS summed over DP ranks from /get_server_info; zeros where the server has none."""
    try:
        states = (await client.get("/get_server_info")).json().get("internal_states", [])
    except (httpx.HTTPError, ValueError):
        states = []
    return {k: sum(s.get(k) or 0 for s in states) for k in COUNTERS}


def run(ns: argparse.Namespace) -> int:
    import logging
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the bar
    cfg = config_from_cli(ns)
    problems = config_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))  # (cli.main prints it as one line, exit code 2)
    try:
        metrics = event_loop.run(benchmark(cfg))
    except NoServer as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(metrics))
    if cfg.output_json:
        with open(cfg.output_json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0 if metrics["completed"] else 1
