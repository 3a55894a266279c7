"""MTP speculative decoding: decode throughput with and without speculation on DeepSeek-V3.2-shaped
layers (benchmarks/engine.py's model plus its MTP layer), CUDA graphs on (the engine's default).

Drafters: `mtp` (the checkpoint's MTP layer; random weights here, so nearly every draft is
rejected: this measures the cost of speculation), `oracle` (each request's greedy continuation from
the run without speculation) and `self` (the previous speculative run's tokens; `--self-runs` replays).
In bf16 a row's logits depend on the step's row count (GEMM kernels are chosen by M) and this random
model's top-2 logits are often near-tied, so `oracle` drafts part from what a verify step computes.
Each batch therefore gets its own speculative engine with graphs for that batch only
(`--cuda-graph-bs b`): every step after the prefill has one shape, a replayed run computes every row
as the run it replays, and `self` reaches the upper bound of S + 1 tokens per step (the table's "as
prev" column shows the runs agree). Prints a table,
writes JSON:

    python benchmarks/spec_decode.py --batch 1 16 64 --steps 3 --output-json spec.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsaserve import LLM, SamplingParams
from dsaserve.tiny import make_tiny_model

from engine import DEEPSEEK_V32_LAYER  # noqa: E402  (benchmarks/ is the script's folder)


def decode_run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], dict[str, float]]:
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    torch.cuda.synchronize()
    start = first = time.perf_counter()
    prefilled = False
    steps = 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
        if not prefilled and all(tokens[r] for r in rids):
            torch.cuda.synchronize()
            first, prefilled, steps = time.perf_counter(), True, 0
        steps += 1
    torch.cuda.synchronize()
    end = time.perf_counter()
    decoded = len(prompts) * (output_len - 1)
    return [tokens[r] for r in rids], dict(decode_s=end - first, decode_tok_s=decoded / (end - first),
                                           ms_per_token=1e3 * (end - first) / (output_len - 1),
                                           ms_per_step=1e3 * (end - first) / max(steps, 1), prefill_s=first - start)


def spec_run(llm: LLM, args: argparse.Namespace, drafter: str, prompts: list[list[int]], reference: list[list[int]],
             spec_tokens: dict[int, list[list[int]]]) -> dict:
    """One measured speculative run. oracle: the non-speculative continuation; self: the previous speculative
    run's tokens (whose rows round as this run's do, so bf16 near-ties cannot part them)."""
    b = len(prompts)
    source = reference if drafter == "oracle" else spec_tokens.get(b, reference)
    conts = {tuple(p[:8]): ref for p, ref in zip(prompts, source)}

    def oracle(req, drafts):  # noqa: ANN001, ANN202
        n = len(req.output_ids)
        return (conts[tuple(req.prompt_ids[:8])][n:n + args.steps] + drafts)[:args.steps]

    llm.engine.draft_override = None if drafter == "mtp" else oracle
    before = llm.engine.stats()
    tokens, stats = decode_run(llm, prompts, args.output_len + args.steps + 1)
    after = llm.engine.stats()
    previous = spec_tokens.get(b)
    spec_tokens[b] = tokens
    same = sum(t[:args.output_len] == r[:args.output_len] for t, r in zip(tokens, reference))
    verifies = after.spec_verify_steps - before.spec_verify_steps
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    again = "" if previous is None else f"{sum(t == p for t, p in zip(tokens, previous))}/{b}"
    return dict(batch=b, drafter=drafter, accept_length=(accepted + verifies) / verifies,
                same_as_reference=f"{same}/{b}", same_as_previous=again, **stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dsaserve-bench-mtp-model")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="float32: tokens equal to the reference (the oracle drafter "
                                                "is then accepted every time)")
    ap.add_argument("--self-runs", type=int, default=2, help="replays of the previous speculative run's tokens "
                                                            "(each agrees with the last over a longer prefix)")
    ap.add_argument("--drafters", nargs="+", default=["mtp", "oracle", "self"], choices=["mtp", "oracle", "self"])
    ap.add_argument("--solo", type=int, default=0, help="run this many requests of each --solo-of batch alone "
                                                       "and report where they part from the batch's tokens")
    ap.add_argument("--solo-of", type=int, nargs="*", default=[])
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    path = Path(args.out)
    if not (path / "config.json").is_file():
        make_tiny_model(path, "deepseek_v32", layers=args.layers, dtype=torch.bfloat16, n_routed_experts=args.experts,
                        **{**DEEPSEEK_V32_LAYER, "num_nextn_predict_layers": 1})
    context = args.input_len + args.output_len + 4 * args.steps + 64  # few key-width buckets to capture
    # No prefix cache: every run prefills its prompts whole, so each run starts from the same cache contents
    # (a partly evicted prefix would be recomputed in another batch shape and part near-ties).
    common = dict(page_size=args.page_size, max_running_requests=max(args.batch), context_length=context,
                  dtype=args.dtype, disable_radix_cache=True,
                  max_total_tokens=max(args.batch) * (args.input_len + args.output_len + 4 * args.steps) + 4096,
                  chunked_prefill_size=max(8192, args.input_len), cuda_graph_max_bs=max(args.batch))
    vocab = DEEPSEEK_V32_LAYER["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompts = {b: [torch.randint(10, vocab, (args.input_len,), generator=gen).tolist() for _ in range(b)]
               for b in args.batch}
    rows = []
    t = time.perf_counter()
    base = LLM(str(path), **common)
    print(f"engine without speculation ready in {time.perf_counter() - t:.0f}s")
    reference = {}
    for b in args.batch:
        decode_run(base, prompts[b][:1], 4)  # first use of every shape outside the measured run
        reference[b], stats = decode_run(base, prompts[b], args.output_len + args.steps + 1)
        again, stats = decode_run(base, prompts[b], args.output_len)  # the same batch twice: deterministic?
        same = sum(t == r[:args.output_len] for t, r in zip(again, reference[b]))
        rows.append(dict(batch=b, drafter="none", accept_length=1.0, same_as_reference=f"{same}/{b}",
                         same_as_previous="", **stats))
    for b in args.solo_of:  # batch invariance: the first requests alone against the batch's tokens
        alone = [decode_run(base, [p], args.output_len)[0][0] for p in prompts[b][:args.solo]]
        parted = [next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), None) for a, r in zip(alone, reference[b])]
        print(f"batch {b}: first {len(alone)} requests run alone part from the batch's tokens at {parted}")
    del base
    torch.cuda.empty_cache()
    spec_tokens: dict[int, list[list[int]]] = {}
    drafters = [d for d in args.drafters if d != "self"] + ["self"] * args.self_runs * ("self" in args.drafters)
    misses = 0
    for b in args.batch:
        # One engine per batch, its graphs made for that batch only (--cuda-graph-bs b): every step after the
        # prefill has the same shape whatever each request accepted or how many still run, so a row rounds
        # alike in every run and `self` replays converge (bucket changes would part bf16 near-ties).
        t = time.perf_counter()
        llm = LLM(str(path), speculative_algorithm="NEXTN", speculative_num_steps=args.steps,
                  **{**common, "cuda_graph_max_bs": b, "cuda_graph_bs": (b,)})
        print(f"engine with speculation (S={args.steps}, graphs for batch {b}) ready in "
              f"{time.perf_counter() - t:.0f}s, {llm.engine.runner.graphs.stats.captured} graphs captured")
        decode_run(llm, prompts[b], 4)  # prefill shapes compile outside the measured runs
        for drafter in drafters:
            rows.append(spec_run(llm, args, drafter, prompts[b], reference[b], spec_tokens))
        misses += llm.engine.runner.graphs.stats.eager_misses
        del llm
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"\n{device}, {args.layers} layers + MTP, S={args.steps}, in {args.input_len}, out {args.output_len}, "
          f"graph misses after start-up: {misses}")
    print(f"{'batch':>5} {'drafter':>7} {'accept':>7} {'ms/token':>9} {'ms/step':>8} {'tok/s':>8} {'speed-up':>9} "
          f"{'same':>6} {'as prev':>7}")
    base_rate = {r["batch"]: r["decode_tok_s"] for r in rows if r["drafter"] == "none"}
    for r in rows:
        print(f"{r['batch']:>5} {r['drafter']:>7} {r['accept_length']:>7.2f} {r['ms_per_token']:>9.2f} "
              f"{r['ms_per_step']:>8.2f} {r['decode_tok_s']:>8.0f} {r['decode_tok_s'] / base_rate[r['batch']]:>8.2f}x "
              f"{r['same_as_reference']:>6} {r['same_as_previous']:>7}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "steps": args.steps, "rows": rows,
                                                      "graph_misses": misses}, indent=1))


if __name__ == "__main__":
    main()
