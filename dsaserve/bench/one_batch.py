"""`dsaserve bench one-batch`: one static batch through the offline engine, no server (as SGLang's
bench_one_batch): prefill latency and throughput, decode step latency and throughput, and on CUDA the
decode step as a fraction of the HBM roofline for the bytes it must read, against the copy bandwidth
measured in the same run; prefill's model FLOPs per second (bench/flops.py: the matmuls the model math
needs, one rank's share) and on CUDA their fraction of the bf16 GEMM rate measured in the same run. Decode
time is the mean of --output-len steps while every request of the batch decodes (mixed steps decode
the first requests while later prompts prefill: they run on past the window, untimed), as the engine
runs them (overlapped scheduling, no sync per step). The engine runs with its defaults (CUDA graphs,
mixed chunks) unless the ServerArgs flags say otherwise. Prints a table and writes JSON (`--output-json`).
With `--tp N` (and `--ep`) it runs N rank processes, as `dsaserve serve` does, and times the leader's steps,
collectives included; rank 0's device gives the ceilings and its weights the roofline's bytes."""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import dsaserve
from dsaserve.bench.flops import prefill_flops
from dsaserve.bench.profile import print_decode_profile, print_prefill_profile
from dsaserve.engine.compiles import kernel_compiles
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import SamplingParams
from dsaserve.engine.warmup import freeze_startup_heap
from dsaserve.planner import weight_bytes
from dsaserve.server.preflight import checked_args
from dsaserve.server_args import ServerArgs


@dataclass(frozen=True)
class Row:
    batch: int
    input_len: int
    output_len: int
    prefill_s: float
    prefill_tok_s: float
    prefill_flops: float  # batch x bench.flops.prefill_flops: matmul FLOPs of the prompts (one rank's share)
    prefill_matmul_fraction: float | None  # prefill FLOP/s over the measured bf16 GEMM rate (CUDA only)
    decode_steps: int  # steps timed, every request of the batch decoding in each
    decode_step_ms: float
    tokens_per_step: float  # tokens a request commits per decode step: 1, or under MTP the accept length
    decode_tok_s: float
    step_bytes: float  # the fewest bytes a decode step reads (weights it touches + KV it attends)
    roofline: float | None  # step_bytes / step time / copy bandwidth (CUDA only)
    compiles: int  # Triton compilations during the run (0 once warmed up: a compile stalls the steps)
    retractions: int  # requests sent back to wait for pages during the run (each is prefilled again)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    ServerArgs.add_cli_args(p, skip=("host", "port", "api_key"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, nargs="+", default=[1024])
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="decode by sampling (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--output-json", default=None)
    p.add_argument("--profile", type=int, nargs="+", default=[], metavar="BATCH",
                   help="then profile decode steps at these batch sizes (the first --input-len): kernels per step, "
                        "idle gaps and one layer's kernels in order (operators on CPU)")
    p.add_argument("--profile-prefill", type=int, nargs="+", default=[], metavar="BATCH",
                   help="then profile the prefill of this many prompts of the first --input-len: its kernels, "
                        "widest first (operators on CPU)")


def median_seconds(work: Callable[[], object], runs: int = 10, warmup: int = 3) -> float:
    """Median device time of `work` over `runs` timed calls, after `warmup` untimed ones (clocks, caches)."""
    times = []
    for _ in range(warmup + runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[warmup:])


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (median of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src))


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 GEMM (median of 10): what this device's matmuls reach when large, the
    yardstick for prefill (issue 13). Random operands, as activations are (zeros can run faster)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b, out = torch.randn_like(a), torch.empty_like(a)
    return 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b, out=out))


def decode_step_bytes(engine: Engine, batch: int, context: int) -> float:
    """Weights a decode step of `batch` rows reads (planner.weight_bytes without the embedding table, the
    routed experts scaled to the share the rows are expected to hit, the indexer's query side only when it
    runs: past index_topk keys) plus the cache it attends: each row reads its top-k latent rows in every layer
    with caches, and every index key of its context where the indexer runs (past index_topk keys). An MTP step's
    drafting is not counted."""
    cfg, weights = engine.cfg, weight_bytes(engine.runner.model)
    hit = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch  # expected share of experts hit
    total = sum(weights.values()) - weights.get("embedding", 0) - weights.get("routed experts", 0) * (1 - hit)
    if context <= cfg.index_topk:  # every key is selected: the indexer's query side does not run
        total -= sum(p.numel() * p.element_size() for n, p in engine.runner.model.named_parameters()
                     if ".indexer.wq_b." in n or ".indexer.weights_proj." in n)
    pools = engine.runner.pools
    latent_row = pools.latent(0).shape[-1] * pools.latent(0).element_size()
    index_layers = [i for i in range(engine.runner.cache_layers) if pools.has_index_keys(i)]
    index_row = pools.index_keys(index_layers[0]).shape[-1] * pools.index_keys(index_layers[0]).element_size()
    keys = len(index_layers) * context * index_row if context > cfg.index_topk else 0  # (else: no selection)
    return total + batch * (engine.runner.cache_layers * min(context, cfg.index_topk) * latent_row + keys)


def decode_lead(batch: int, input_len: int, chunk: int, spec_steps: int = 0) -> int:
    """Most tokens a request decodes before the batch's last prompt is prefilled: with mixed steps each
    early request has a decode row in every later prefill step (rows that share the step's token budget), each
    committing up to S + 1 tokens under MTP."""
    return (-(-batch * input_len // max(chunk - batch, 1)) + 1) * (spec_steps + 1)


def run_one(engine: Engine, batch: int, input_len: int, output_len: int, bandwidth: float | None,
            matmul: float | None = None, sampling: dict[str, float] | None = None) -> Row:
    """sampling: SamplingParams fields (temperature, top_p, top_k); greedy without."""
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    # The measured prefill must find no cached prefix: an earlier run may have drawn the same prompts (the
    # warm-up of the same shape does, at output_len 4).
    engine.evict_prefix_cache()
    gen = torch.Generator().manual_seed(batch * 7919 + input_len * 31 + output_len)
    lead = decode_lead(batch, input_len, engine.scheduler.cfg.chunked_prefill_size, engine.spec_steps)
    params = SamplingParams(max_tokens=output_len * (engine.spec_steps + 1) + lead, ignore_eos=True,
                            **{"temperature": 0.0, **(sampling or {})})
    rids = [f"b{batch}-{input_len}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid in rids:
        engine.add_request(rid, torch.randint(10, engine.cfg.vocab_size, (input_len,), generator=gen).tolist(),
                           params)
    sync()
    compiles0, retractions0 = kernel_compiles(), engine.scheduler.num_retractions
    start = time.perf_counter()
    started: set[str] = set()
    while len(started) < batch:  # prefill: every request has its first token (early ones decode meanwhile)
        if not engine.has_work():
            raise RuntimeError(f"only {len(started)} of {batch} requests produced a token")
        started.update(o.rid for o in engine.step() if o.new_token_ids)
    sync()  # (with overlap this includes one decode step, launched before the last first token was read)
    prefill_s = time.perf_counter() - start
    # Decode: output_len steps while every request runs (none can reach max_tokens: the early ones are at
    # most `lead` tokens ahead), timed as the engine runs them (overlapped scheduling: no sync per step).
    context = sum(engine.requests[rid].num_tokens for rid in rids) / batch  # at the window's start
    first, start, committed, returned = engine.steps, time.perf_counter(), 0, 0
    for _ in range(output_len):
        outs = engine.step()
        if any(o.finish is not None for o in outs):
            raise RuntimeError(f"a request ended inside the decode window (more than {lead} tokens ahead)")
        committed += sum(len(o.new_token_ids) for o in outs)
        returned += any(o.new_token_ids for o in outs)
    sync()
    launched, elapsed = engine.steps - first, time.perf_counter() - start
    tokens_per_row = committed / (batch * returned) if returned else 1.0  # per request per step: 1, or MTP's
    engine.run_until_idle()
    step = elapsed / launched if launched else float("nan")
    nbytes = decode_step_bytes(engine, batch, round(context + output_len * tokens_per_row / 2))  # its middle
    flops = batch * prefill_flops(engine.runner.model, input_len, engine.spec_steps)
    return Row(batch, input_len, output_len, prefill_s, batch * input_len / prefill_s, flops,
               flops / prefill_s / matmul if matmul else None, launched, 1e3 * step, tokens_per_row,
               batch * tokens_per_row / step,
               nbytes,
               nbytes / step / bandwidth if bandwidth else None, kernel_compiles() - compiles0,
               engine.scheduler.num_retractions - retractions0)


def run(ns: argparse.Namespace) -> int:
    args = ServerArgs.from_cli(ns)
    sizes = {"--batch-size": min(ns.batch_size), "--input-len": min(ns.input_len), "--output-len": ns.output_len}
    bad = [f"{flag} must be >= 1, got {value}" for flag, value in sizes.items() if value < 1]
    if (args.dp, args.nnodes) != (1, 1):
        bad.append("bench one-batch runs one DP group on this machine: leave out --dp / --nnodes (--tp N and --ep "
                   "run N ranks here)")
    if bad:
        raise ValueError("; ".join(bad))  # (cli.main prints it as one line, exit code 2)
    SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k).validate()  # before the load
    args = checked_args(args)  # serve's checks of the model and the flags that depend on it (--context-length)
    batch = max(ns.batch_size + ns.profile + ns.profile_prefill)
    chunk = max(args.chunked_prefill_size, max(ns.input_len))
    steps = args.spec_steps  # MTP: a step commits up to S + 1 tokens per request
    longest = max(ns.input_len) + ns.output_len * (steps + 1) + decode_lead(batch, max(ns.input_len), chunk, steps)
    args = args.replace(max_running_requests=max(batch, args.running_per_group), chunked_prefill_size=chunk,
                        max_total_tokens=args.max_total_tokens or batch * (longest + args.page_size) + 4096)
    if args.tp > 1:
        return _run_ranks(ns, args)
    t = time.perf_counter()
    engine = Engine(args, progress=True)
    freeze_startup_heap()  # as the server does
    try:
        return _run(ns, engine, time.perf_counter() - t)
    finally:
        gc.unfreeze()  # (a caller's process: its objects collect as before)


def _run_ranks(ns: argparse.Namespace, args: ServerArgs) -> int:
    """--tp N: N rank processes (spawned, as the server's); rank 0 leads and reports. Its exit code is the run's;
    the others leave with the leader's stop, or are ended if it failed before sending it."""
    from dsaserve.parallel.nodes import free_port
    ctx = mp.get_context("spawn")
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(ns, args, rank, addr), daemon=True) for rank in range(args.tp)]
    for p in procs:
        p.start()
    procs[0].join()
    for p in procs[1:]:
        p.join(timeout=30 if procs[0].exitcode == 0 else 2)
        if p.is_alive():
            p.kill()
    return procs[0].exitcode or 0


def _rank_main(ns: argparse.Namespace, args: ServerArgs, rank: int, addr: str) -> None:
    import sys

    from dsaserve.engine.lockstep import follow
    from dsaserve.parallel.launch import init_distributed
    par = init_distributed(args, rank, addr)
    t = time.perf_counter()
    engine = Engine(args, progress=rank == 0, par=par)
    freeze_startup_heap()
    if not par.cfg.is_leader:
        follow(engine)  # the leader's steps, until it stops every rank
        par.close()
        return
    try:
        code = _run(ns, engine, time.perf_counter() - t)
    finally:
        engine.step(stop=True)
    par.close()
    sys.exit(code)


def _run(ns: argparse.Namespace, engine: Engine, startup_s: float) -> int:
    # the package's folder: an A/B of two trees shows which one ran (`python -m` puts the current folder first)
    print(f"engine ready in {startup_s:.1f}s, dsaserve from {Path(dsaserve.__file__).parent}")
    compiles_at_ready = kernel_compiles()
    device = engine.runner.device
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    matmul = matmul_rate(device) if device.type == "cuda" else None
    rows = []
    sampling = dict(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k)
    for input_len in ns.input_len:
        for batch in ns.batch_size:
            run_one(engine, batch, input_len, 4, bandwidth, matmul, sampling)  # every shape once before it is timed
            rows.append(run_one(engine, batch, input_len, ns.output_len, bandwidth, matmul, sampling))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, {engine.model_path}, {engine.runner.dtype}, graphs up to batch "
          f"{engine.runner.graphs.max_bs if engine.runner.graphs else 0}"
          + (f", copy {bandwidth / 1e12:.2f} TB/s" if bandwidth else "")
          + (f", bf16 matmul {matmul / 1e12:.0f} TFLOP/s" if matmul else "")
          + (", greedy" if not ns.temperature else f", sampled ({', '.join(f'{k} {v}' for k, v in sampling.items())})"))
    print(f"{'batch':>5} {'in':>6} {'out':>5} {'prefill s':>10} {'prefill tok/s':>14} {'prefill TF/s':>13} "
          f"{'of matmul':>10} {'decode ms':>10} {'tok/step':>9} "
          f"{'decode tok/s':>13} {'step MB':>8} {'roofline':>9} {'compiles':>9} {'retracted':>10}")
    for r in rows:
        roof = f"{100 * r.roofline:.1f}%" if r.roofline is not None else "-"
        mm = f"{100 * r.prefill_matmul_fraction:.1f}%" if r.prefill_matmul_fraction is not None else "-"
        print(f"{r.batch:>5} {r.input_len:>6} {r.output_len:>5} {r.prefill_s:>10.3f} {r.prefill_tok_s:>14.0f} "
              f"{r.prefill_flops / r.prefill_s / 1e12:>13.2f} {mm:>10} {r.decode_step_ms:>10.2f} "
              f"{r.tokens_per_step:>9.2f} "
              f"{r.decode_tok_s:>13.0f} {r.step_bytes / 1e6:>8.1f} {roof:>9} "
              f"{r.compiles:>9} {r.retractions:>10}")
    # the rows count their timed runs only; a compile in a shape's untimed first run would have stalled a request
    after_ready = kernel_compiles() - compiles_at_ready
    print(f"Triton compilations since the engine was ready (untimed first runs included): {after_ready}")
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps({"device": name, "model": engine.model_path,
                                                    "copy_bytes_per_s": bandwidth, "matmul_flop_per_s": matmul,
                                                    "sampling": sampling, "compiles_after_ready": after_ready,
                                                    "rows": [asdict(r) for r in rows]}, indent=1))
    for batch in ns.profile:
        print_decode_profile(engine, batch, ns.input_len[0])
    for batch in ns.profile_prefill:
        print_prefill_profile(engine, batch, ns.input_len[0])
    return 0
