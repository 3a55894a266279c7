"""Rank processes: torch.distributed init (gloo on CPU, NCCL on CUDA), multi-node arguments, and
an offline runner that drives every DP group leader with its own requests (tests, benchmarks)."""
from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing as mp
import os
import queue
import socket
import struct
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from dsaserve.engine.request import SamplingParams
from dsaserve.parallel.groups import Parallel, ParallelConfig
from dsaserve.parallel.nodes import describe_exit, free_port, ranks_on_this_node
from dsaserve.server_args import ServerArgs, SettingError, split_host_port

log = logging.getLogger(__name__)

# run_jobs' rank processes fork from one forkserver that imported these once: torch, the engine and the
# tokenizer's transformers modules take about 7 s per process to import on a 2-core machine, and a test process
# launches dozens of rank groups. The forkserver never touches CUDA, so its children may. (A server starts its
# ranks once, by spawn: dsaserve/server/supervisor.py.)
RANK_PRELOAD = ("dsaserve.engine.engine", "transformers.models.auto.tokenization_auto")
DEFAULT_DIST_TIMEOUT_S = 1800  # --dist-timeout's default
# Flags (and spec_steps, from them) that every node must give alike: they decide the world, its groups, the
# shapes and buffers of every step, the graphs captured (each capture runs collectives) and the weights. (The KV
# pool's size may differ: the ranks agree on the smallest; scheduling flags are read by the leaders, all on node 0.)
SAME_ON_EVERY_NODE = ("tp", "dp", "ep", "enable_dp_attention", "nnodes", "page_size", "dtype", "kv_cache_dtype",
                      "spec_steps", "disaggregation_mode", "context_length", "max_running_requests",
                      "chunked_prefill_size", "cuda_graph_max_bs", "cuda_graph_bs", "attention_backend", "moe_backend",
                      "load_format", "json_model_override_args")


def init_distributed(args: ServerArgs, rank: int, init_addr: str) -> Parallel:
    """Join the process group; returns the collectives for this rank (size 1: no process group).

    The store (rank 0) listens on the host of `init_addr` only, and gloo / NCCL sockets bind to the
    interface that reaches it (loopback on one node), unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    say otherwise.
    """
    cfg = ParallelConfig(args.tp, args.dp, rank, args.ep)
    if args.tp == 1:
        return Parallel(cfg)
    local = ranks_on_this_node(args)
    if rank not in local:
        raise ValueError(f"rank {rank} does not run on node {args.node_rank} (its ranks are {list(local)})")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(rank - local.start)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(local)))
    host, port = split_host_port(init_addr) or (None, 0)
    if host is None:
        raise ValueError(f"--dist-init-addr must be HOST:PORT, got {init_addr!r}")
    ifname = None if host in ("0.0.0.0", "::") else interface_for(host)  # all interfaces: as the user asked
    if ifname is not None:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, ifname)
    # explicit for both backends: torch's default is 30 min for gloo but 10 for NCCL
    timeout = timedelta(seconds=args.dist_timeout or DEFAULT_DIST_TIMEOUT_S)
    store = _store(host, port, rank, args.tp, timeout)
    node_id = f"{socket.gethostname()}/{os.getppid()}"  # this node's server process (it spawned the ranks)
    check_nodes_agree(store, args, rank, "nccl" if use_cuda else "gloo", timeout, node_id)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, world_size=args.tp, rank=rank,
                            timeout=timeout)
    return Parallel(cfg, timeout)


def _store(host: str, port: int, rank: int, world: int, timeout: timedelta) -> dist.TCPStore:
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    try:  # bound here, on this host only: torch's own store would listen on every interface
        listener = socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        raise ValueError(f"the torch.distributed store cannot listen on {host}:{port} (--dist-init-addr): "
                         f"{exc.strerror}") from None
    # not waiting here for `world` clients: a node started with a smaller --tp never brings them all, and
    # check_nodes_agree must run to say so (init_process_group waits for every rank itself)
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def _node_flags(args: ServerArgs, backend: str) -> dict[str, Any]:
    """As node 0 publishes them (through JSON: a tuple of batch sizes compares as the list it becomes)."""
    return json.loads(json.dumps({**{name: getattr(args, name) for name in SAME_ON_EVERY_NODE}, "backend": backend}))


def _flag(name: str) -> str:
    return {"spec_steps": "--speculative-num-steps", "backend": "--device (the backend)"}.get(
        name, "--" + name.replace("_", "-"))


def check_nodes_agree(store: Any, args: ServerArgs, rank: int, backend: str, timeout: timedelta,
                      node_id: str) -> None:
    """Before the process group forms: every rank of every node compares the flags that shape the world and the
    steps (SAME_ON_EVERY_NODE) with node 0's, and claims its --node-rank for its node (`node_id`: the server
    process that started it): the ranks of one node all pass or all fail, so two nodes given one --node-rank cannot
    each win some of its ranks. A node started with other flags (or a --node-rank another node has) refuses them
    with SettingError naming them, and so does rank 0, which waits for every rank's answer: before, both nodes
    waited in the process group's start until --dist-timeout."""
    if args.nnodes == 1:  # one server process started every rank, with one ServerArgs
        return
    mine = _node_flags(args, backend)
    if rank == 0:
        store.set("dsaserve/flags", json.dumps(mine))
        deadline = time.monotonic() + timeout.total_seconds()
        while store.add("dsaserve/agreed", 0) < args.tp - 1:
            if store.check(["dsaserve/refused"]):
                raise SettingError(store.get("dsaserve/refused").decode())
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks of the other nodes did not join within {timeout.total_seconds():.0f} s "
                                   f"(--dist-timeout)")
            time.sleep(0.05)
        return
    node0 = json.loads(store.get("dsaserve/flags"))  # waits for node 0 (as long as the store's timeout)
    differ = [f"{_flag(n)} {mine[n]!r} on node {args.node_rank}, {node0.get(n)!r} on node 0" for n in mine
              if mine[n] != node0.get(n)]
    problem = None
    if differ:
        problem = f"every node must be started with the same flags, but {'; '.join(differ)}"
    elif store.compare_set(f"dsaserve/node/{args.node_rank}", "", node_id).decode() != node_id:
        problem = f"rank {rank} was started twice: two nodes were given --node-rank {args.node_rank}"
    if problem is not None:
        store.set("dsaserve/refused", problem)
        raise SettingError(problem)
    store.add("dsaserve/agreed", 1)


def _family(host: str) -> socket.AddressFamily:
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def interface_for(host: str) -> str | None:
    """The name of the local IPv4 interface whose address routes to `host` (None if unknown)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing: it only picks the route
            local = probe.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == local:
            return name
    return None


@dataclass(frozen=True)
class OfflineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    dp_rank: int = 0
    arrive_at_step: int = 0  # the leader adds it once its step counter reaches this


@dataclass(frozen=True)
class Job:
    """One engine run: ServerArgs overrides (model_path, page_size, ...) and its requests; scored: results are
    (token id, log-probability) pairs (requests must ask for logprobs)."""
    overrides: dict[str, Any]
    requests: list[OfflineRequest] = field(default_factory=list)
    scored: bool = False

    def __post_init__(self) -> None:
        if self.scored and any(r.params.logprobs is None for r in self.requests):
            raise ValueError("a scored Job's requests must ask for logprobs (SamplingParams(logprobs=0))")


def _run_job(args: ServerArgs, par: Parallel, job: Job) -> dict[int, list]:
    """Token ids per request, or (token id, log-probability) pairs (Job.scored)."""
    from dsaserve.engine.engine import Engine
    engine = Engine(args.replace(**job.overrides), progress=False, par=par)
    mine = [(i, r) for i, r in enumerate(job.requests) if r.dp_rank == par.cfg.dp_rank] if par.cfg.is_leader else []
    tokens: dict[int, list] = {i: [] for i, _ in mine}
    rid_to_index = {}
    step = 0
    while True:
        for i, r in [(i, r) for i, r in mine if r.arrive_at_step == step]:
            rid_to_index[f"job-{i}"] = i
            engine.add_request(f"job-{i}", r.prompt_ids, r.params)
        later = any(r.arrive_at_step > step for _, r in mine) or bool(engine.grammars.held)  # (still compiling)
        for out in engine.step(keep_alive=later):
            i = rid_to_index[out.rid]
            new = out.new_token_ids
            tokens[i] += zip(new, [lp for lp, _ in out.new_logprobs]) if job.scored else new
        step += 1
        if not engine.last_sync.any_work:
            return tokens


def _rank_main(args: ServerArgs, rank: int, init_addr: str, jobs: list[Job], results: Any,
               setup: Callable[[int], None] | None, env: dict[str, str]) -> None:
    os.environ.clear()  # the caller's environment now, not the forkserver's from its start
    os.environ.update(env)
    try:
        if setup is not None:
            setup(rank)
        par = init_distributed(args, rank, init_addr)
        for j, job in enumerate(jobs):
            tokens = _run_job(args, par, job)
            if par.cfg.is_leader:
                results.put(("ok", j, tokens))
        if args.tp > 1:
            par.exchange([0])  # a barrier: rank 0 hosts the store and must not leave first
            dist.destroy_process_group()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise


def run_jobs(args: ServerArgs, jobs: list[Job], timeout_s: float = 300.0,
             setup: Callable[[int], None] | None = None) -> list[list[list]]:
    """Run the jobs on `args.tp` local rank processes; greedy/sampled token ids per request, per job ((token id,
    log-probability) pairs for a Job.scored).
    `setup(rank)` (picklable) runs first in each rank process: fault injection in tests."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(RANK_PRELOAD))  # no effect once this process's forkserver runs
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(args, r, addr, jobs, results, setup, dict(os.environ)),
                          daemon=True)
             for r in range(args.tp)]
    for p in procs:
        p.start()
    merged: list[dict[int, list]] = [{} for _ in jobs]
    done = False
    try:
        for _ in range(len(jobs) * args.dp):
            kind, key, payload = _next_result(results, procs, timeout_s)
            if kind == "error":
                raise RuntimeError(f"rank {key} failed:\n{payload}")
            merged[key].update(payload)
        done = True
    finally:
        for p in procs:  # after a failure the others may wait in a collective for the dist timeout: not for them
            p.join(timeout=10 if done else 0.5)
            if p.is_alive():
                p.kill()
    return [[merged[j][i] for i in range(len(job.requests))] for j, job in enumerate(jobs)]


def _next_result(results: Any, procs: list, timeout_s: float) -> tuple:
    """The next rank message; a rank that died without one (killed, or failed before its `try`) raises at once
    rather than after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                try:  # its error message may have arrived since
                    return results.get(timeout=1.0)
                except queue.Empty:
                    rank, code = dead[0]
                    raise RuntimeError(f"rank {rank} exited ({describe_exit(code)}) and no result") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank processes gave no result within {timeout_s}s") from None
