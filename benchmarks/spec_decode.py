"""MTP speculative decoding: decode throughput with and without speculation on DeepSeek-V3.2-shaped
layers (benchmarks/engine.py's model plus its MTP layer), CUDA graphs on (the engine's default).

Drafters: `mtp` (the checkpoint's MTP layer; random weights here, so nearly every draft is
rejected: this measures the cost of speculation), `oracle` (each request's greedy continuation from
the run without speculation) and `self` (the previous speculative run's tokens, run twice: its verify
rows round as the measured run's, so bf16 near-ties do not part them; this approaches the upper bound
of S + 1 tokens per step; `--self-runs` replays). Each row checks that the
tokens are compared with the non-speculative run: in fp32 they are equal (tests/test_cuda_graph.py); in
bf16 a verify step's rows round differently from one-row decode steps, so a near-tied argmax can flip
and a request leave the reference; the table reports how many requests kept it. Prints a table,
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
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    path = Path(args.out)
    if not (path / "config.json").is_file():
        make_tiny_model(path, "deepseek_v32", layers=args.layers, dtype=torch.bfloat16, n_routed_experts=args.experts,
                        **{**DEEPSEEK_V32_LAYER, "num_nextn_predict_layers": 1})
    context = args.input_len + args.output_len + 4 * args.steps + 64  # few key-width buckets to capture
    common = dict(page_size=args.page_size, max_running_requests=max(args.batch), context_length=context,
                  dtype=args.dtype,
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
        _, stats = decode_run(base, prompts[b], args.output_len)
        rows.append(dict(batch=b, drafter="none", accept_length=1.0, same_as_reference=f"{b}/{b}", **stats))
    del base
    torch.cuda.empty_cache()
    t = time.perf_counter()
    llm = LLM(str(path), speculative_algorithm="NEXTN", speculative_num_steps=args.steps, **common)
    print(f"engine with speculation (S={args.steps}) ready in {time.perf_counter() - t:.0f}s, "
          f"{llm.engine.runner.graphs.stats.captured} graphs captured")
    for b in args.batch:
        decode_run(llm, prompts[b], 4)  # the speculative engine's shapes compile outside the measured runs
    spec_tokens: dict[int, list[list[int]]] = {}
    for drafter in ("mtp", "oracle") + ("self",) * args.self_runs:
        for b in args.batch:
            # oracle: the non-speculative continuation; self: the previous speculative run's tokens, whose
            # verify rows round as the measured run's do (bf16 near-ties then cannot part them).
            source = reference[b] if drafter == "oracle" else spec_tokens.get(b, reference[b])
            conts = {tuple(p[:8]): ref for p, ref in zip(prompts[b], source)}

            def oracle(req, drafts, conts=conts):  # noqa: ANN001, ANN202
                n = len(req.output_ids)
                return (conts[tuple(req.prompt_ids[:8])][n:n + args.steps] + drafts)[:args.steps]

            llm.engine.draft_override = None if drafter == "mtp" else oracle
            before = llm.engine.stats()
            tokens, stats = decode_run(llm, prompts[b], args.output_len + args.steps + 1)
            after = llm.engine.stats()
            spec_tokens[b] = tokens
            same = sum(t[:args.output_len] == r[:args.output_len] for t, r in zip(tokens, reference[b]))
            verifies = after.spec_verify_steps - before.spec_verify_steps
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            rows.append(dict(batch=b, drafter=drafter, accept_length=(accepted + verifies) / verifies,
                             same_as_reference=f"{same}/{b}", **stats))
    misses = llm.engine.runner.graphs.stats.eager_misses
    device = torch.cuda.get_device_name()
    print(f"\n{device}, {args.layers} layers + MTP, S={args.steps}, in {args.input_len}, out {args.output_len}, "
          f"graph misses after start-up: {misses}")
    print(f"{'batch':>5} {'drafter':>7} {'accept':>7} {'ms/token':>9} {'ms/step':>8} {'tok/s':>8} {'speed-up':>9} "
          f"{'same':>6}")
    base_rate = {r["batch"]: r["decode_tok_s"] for r in rows if r["drafter"] == "none"}
    for r in rows:
        print(f"{r['batch']:>5} {r['drafter']:>7} {r['accept_length']:>7.2f} {r['ms_per_token']:>9.2f} "
              f"{r['ms_per_step']:>8.2f} {r['decode_tok_s']:>8.0f} {r['decode_tok_s'] / base_rate[r['batch']]:>8.2f}x "
              f"{r['same_as_reference']:>6}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "steps": args.steps, "rows": rows,
                                                      "graph_misses": misses}, indent=1))


if __name__ == "__main__":
    main()
