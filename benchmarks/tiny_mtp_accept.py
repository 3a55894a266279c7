"""MTP accept length of the embedded model (dsaserve/assets/tiny-dsa) with --speculative-num-steps 1, 2, 3.

Greedy continuations of held-out standard-library docstrings (prompts the model never trained on),
through the engine the server runs; every speculative run must give the same tokens as the run
without speculation (fp32: exact). Accept length = tokens a verify step yields per request
(accepted drafts + the target's own token), and output tokens per second next to the run without
speculation (on CPU only the ratio means anything). Prints a table; CPU or GPU:

    python benchmarks/tiny_mtp_accept.py [--prompts 16] [--prompt-len 128] [--output-len 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

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
    args = ap.parse_args()
    path = str(default_model_path())
    held = token_stream(build_corpus().held_out, Tokenizer.from_file(f"{path}/tokenizer.json"))
    prompts = windows(held, args.prompt_len)[:args.prompts].tolist()
    common = dict(device=args.device, dtype=args.dtype, page_size=64, max_total_tokens=65536)
    reference, _, base_rate = run(LLM(path, **common), prompts, args.output_len)
    rows = []
    for s in args.steps:
        llm = LLM(path, speculative_algorithm="NEXTN", speculative_num_steps=s, **common)
        tokens, accept, rate = run(llm, prompts, args.output_len)
        rows.append((s, accept, sum(t == r for t, r in zip(tokens, reference)), rate))
    print(f"\nembedded tiny-dsa, {args.prompts} held-out prompts of {args.prompt_len} tokens, {args.output_len} "
          f"greedy tokens each, {args.device} {args.dtype}")
    print(f"{'steps':>5} {'accept length':>14} {'same tokens as no speculation':>30} {'tok/s':>8} {'speed-up':>9}")
    print(f"{0:>5} {1.0:>14.3f} {'':>30} {base_rate:>8.0f} {1.0:>8.2f}x")
    for s, accept, same, rate in rows:
        print(f"{s:>5} {accept:>14.3f} {f'{same}/{len(prompts)}':>30} {rate:>8.0f} {rate / base_rate:>8.2f}x")


if __name__ == "__main__":
    main()
