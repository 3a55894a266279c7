"""dsaserve serve | generate | make-tiny-model | train-tiny | plan | bench | router."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from dsaserve import sglang_flags
from dsaserve.server_args import ServerArgs


def _generate(ns: argparse.Namespace) -> int:
    from dsaserve.engine.request import RequestError, SamplingParams
    from dsaserve.llm import LLM
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                            top_k=ns.top_k, seed=ns.sampling_seed)
    try:
        params.validate()  # before the model loads
    except RequestError as exc:
        flags = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                 "seed": "--sampling-seed"}
        field = str(exc).split(" ", 1)[0]
        print(f"error: {flags.get(field, field)}{str(exc)[len(field):]}", file=sys.stderr)
        return 2
    llm = LLM(progress=True, **vars(ServerArgs.from_cli(ns)))  # (serve's checks first: no traceback from a load)
    try:
        out = llm.generate(ns.prompt, params)[0]
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason.kind}]", file=sys.stderr)
    return 0


def _make_tiny(ns: argparse.Namespace) -> int:
    from dsaserve.tiny import make_tiny_model
    path = make_tiny_model(ns.out, ns.arch, fp8=ns.fp8, layers=ns.layers, seed=ns.seed, fp8_block=ns.fp8_block)
    print(f"wrote a tiny {ns.arch} checkpoint to {path}")
    return 0


def _train_tiny(ns: argparse.Namespace) -> int:
    from dsaserve.train_tiny import train_tiny
    train_tiny(ns.out, ns.preset, seed=ns.seed, threads=ns.threads)
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from dsaserve.server.launch import serve
    return serve(ServerArgs.from_cli(ns))


def _bench_serving(ns: argparse.Namespace) -> int:
    from dsaserve.bench.serving import run
    return run(ns)


def _router(ns: argparse.Namespace) -> int:
    """sglang-router, with the arguments as given (its --help lists them; router_flags checks some, and makes
    it listen on loopback unless --host says otherwise): exec, so signals reach it."""
    import importlib.util

    from dsaserve import router_flags
    if importlib.util.find_spec("sglang_router") is None:
        print("error: dsaserve router needs sglang-router: pip install sglang-router", file=sys.stderr)
        return 2
    wrong = router_flags.problems(ns.router_args)
    if wrong:
        print(f"error: {'; '.join(wrong)}", file=sys.stderr)
        return 2
    for notice in router_flags.notices(ns.router_args):
        print(f"warning: {notice}", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, "-m", "sglang_router.launch_router",
                              *router_flags.with_loopback_defaults(ns.router_args)])
    return 0  # not reached


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from dsaserve import planner
    plan = sub.add_parser("plan", help="per-rank weight and KV memory of a deployment, from config.json alone")
    planner.add_cli_args(plan)
    plan.set_defaults(func=planner.run)


def _add_bench(sub: argparse._SubParsersAction, client_only: bool) -> None:
    from dsaserve.bench import serving
    bench = sub.add_parser("bench", help="benchmarks: a live server, or one static batch offline")
    kinds = bench.add_subparsers(dest="bench", required=True)
    live = kinds.add_parser("serving", help="load an OpenAI-compatible server; print throughput and latency")
    serving.add_cli_args(live)
    live.set_defaults(func=_bench_serving)
    if client_only:  # `bench serving`: the client never imports torch
        return
    from dsaserve.bench import one_batch
    static = kinds.add_parser("one-batch", help="one static batch without a server: prefill and decode latency, "
                                                "throughput, and the decode step's HBM roofline fraction (CUDA)")
    one_batch.add_cli_args(static)
    static.set_defaults(func=one_batch.run)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that wait passively (before torch loads; the ranks inherit it; a value given wins): two CPU
    # servers on one machine (a PD pair, a router's workers) spun on each other's cores, 16.5 s for what takes
    # 0.2 s alone (docs/benchmarks.md); alone a server is as fast either way.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="dsaserve", description="Serve DeepSeek Sparse Attention models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    ServerArgs.add_cli_args(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="complete one prompt offline and print it")
    ServerArgs.add_cli_args(gen, skip=("host", "port", "api_key", "served_model_name"))
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint in the official format")
    tiny.add_argument("out")
    tiny.add_argument("--arch", choices=["deepseek_v32", "glm_moe_dsa"], default="deepseek_v32")
    tiny.add_argument("--fp8", action="store_true", help="store linear weights as e4m3 with block scales")
    tiny.add_argument("--fp8-block", type=int, default=128,
                      help="the scale blocks' side (the official 128; 8 lets --tp 2 and 4 split the tiny widths on "
                           "whole blocks, which 128 cannot)")
    tiny.add_argument("--layers", type=int, default=None)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    train = sub.add_parser("train-tiny", help="train the embedded default model on CPU (minutes); write its checkpoint")
    train.add_argument("out", help="checkpoint folder (the shipped one is dsaserve/assets/tiny-dsa)")
    train.add_argument("--preset", default="shipped", help="shipped (the embedded model) or test (seconds, toy scale)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    train.set_defaults(func=_train_tiny)

    argv = sys.argv[1:] if argv is None else argv
    # `bench one-batch` and `plan` import torch: their parsers are built only when asked for (or for --help and
    # typos), so `dsaserve serve` starts its ranks and `bench serving` its clients without waiting for it.
    first = argv[0] if argv else ""
    others = first not in ("serve", "generate", "make-tiny-model", "train-tiny", "bench", "plan")
    if first == "bench" or others:
        _add_bench(sub, client_only=argv[:2] == ["bench", "serving"])
    if first == "plan" or others:
        _add_plan(sub)

    # Listed for --help only: main() hands every argument after "router" to sglang-router itself.
    sub.add_parser("router", add_help=False, help="run sglang-router (PD pairs with --pd-disaggregation "
                                                  "--prefill URL BOOTSTRAP_PORT --decode URL, or --worker-urls)")

    if argv[:1] == ["router"]:  # every argument is sglang-router's (argparse would take --help and the like)
        return _router(argparse.Namespace(router_args=argv[1:]))
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # SGLang launch lines: say what to use instead of its flags that dsaserve does not take
        takes_server_flags = ns.command in ("serve", "generate", "plan") or getattr(ns, "bench", "") == "one-batch"
        lines, all_sglang = sglang_flags.guidance(unknown) if takes_server_flags else ([], False)
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        if not all_sglang:  # (the subcommand's usage: the top level's lists only the parsers built for this line)
            sub.choices.get(ns.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        return 2
    level = getattr(ns, "log_level", "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):  # before logging is set up with it
        print(f"error: --log-level must be debug, info, warning or error, got {ns.log_level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except ValueError as exc:  # configuration and checkpoint errors: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
