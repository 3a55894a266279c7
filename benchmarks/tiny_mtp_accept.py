"""MTP accept length of the embedded model (dsaserve/assets/tiny-dsa) with --speculative-num-steps 1, 2, 3.

Greedy continuations of held-out standard-library docstrings (prompts the model never trained on),
through the engine the server runs; every speculative run must give the same tokens as the run
without speculation (fp32: exact). Accept length = tokens a verify step yields per request
(accepted drafts + the target's own token), and output tokens per second next to the run without
speculation (on CPU only the ratio means anything). Prints a table; CPU or GPU:

    python benchmarks/tiny_mtp_accept.py [--prompts 16] [--prompt-len 128] [--output-len 64] [--device cpu]
                                         [--index-share] [--out accept.json]

--index-share adds the runs of two steps and more with GLM-5.2's index_share_for_mtp_iteration switched on (the
draft steps after the first attend the first's top-k): what that costs a drafter not trained with it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenizers import Tokenizer

from dsaserve import LLM, SamplingParams
from dsaserve.model.checkpoint import default_model_path
from dsaserve.train_tiny.corpus import build_corpus, token_stream, windows


def run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], float | None, float]:
    """Tokens, accept length and output tokens per second (wall time of the whole batch, prefill included;
    one short untimed batch first, so kernels compile and graphs are made outside the timing)."""
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    elapsed = time.perf_counter() - start
    after = llm.engine.stats()
    verifies = after.spec_verify_steps - before.spec_verify_steps
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    return ([o.token_ids for o in outs], (accepted + verifies) / verifies if verifies else None,
            len(prompts) * output_len / elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--index-share", action="store_true", help="also run S >= 2 with index_share_for_mtp_iteration")
    ap.add_argument("--out", help="write the table's rows as JSON here")
    args = ap.parse_args()
    path = str(default_model_path())
    held = token_stream(build_corpus().held_out, Tokenizer.from_file(f"{path}/tokenizer.json"))
    prompts = windows(held, args.prompt_len)[:args.prompts].tolist()
    common = dict(device=args.device, dtype=args.dtype, page_size=64, max_total_tokens=65536)
    reference, _, base_rate = run(LLM(path, **common), prompts, args.output_len)
    rows = []
    shared = '{"index_share_for_mtp_iteration": true}'
    runs = [(s, None) for s in args.steps] + [(s, shared) for s in args.steps if s > 1 and args.index_share]
    for s, override in runs:
        llm = LLM(path, speculative_algorithm="NEXTN", speculative_num_steps=s, json_model_override_args=override,
                  **common)
        tokens, accept, rate = run(llm, prompts, args.output_len)
        rows.append((f"{s}{' shared' if override else ''}", accept, sum(t == r for t, r in zip(tokens, reference)),
                     rate))
    print(f"\nembedded tiny-dsa, {args.prompts} held-out prompts of {args.prompt_len} tokens, {args.output_len} "
          f"greedy tokens each, {args.device} {args.dtype}")
    print(f"{'steps':>8} {'accept length':>14} {'same tokens as no speculation':>30} {'tok/s':>8} {'speed-up':>9}")
    print(f"{0:>8} {1.0:>14.3f} {'':>30} {base_rate:>8.0f} {1.0:>8.2f}x")
    for s, accept, same, rate in rows:
        print(f"{s:>8} {accept:>14.3f} {f'{same}/{len(prompts)}':>30} {rate:>8.0f} {rate / base_rate:>8.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "base_tok_s": base_rate, "rows": [
            dict(steps=s, accept_length=a, same_tokens=same, prompts=len(prompts), tok_s=r) for s, a, same, r in rows]},
            indent=1))


if __name__ == "__main__":
    main()
