"""Is a batch computed the same way twice? Runs the same greedy batch twice through one engine (no prefix
cache, so both runs prefill alike) and compares every module's output of the first steps bit for bit;
prints the first module whose outputs differ, or that the runs agree. Eager (no CUDA graphs) so forward
hooks see every call. On benchmarks/engine.py's DeepSeek-V3.2-width layers by default:

    python benchmarks/determinism.py [--out /tmp/det-model] [--batch 16] [--steps 6] [--output-len 16] [--graphs]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsaserve import LLM, SamplingParams
from dsaserve.tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import DEEPSEEK_V32_LAYER  # noqa: E402


def record(llm: LLM, prompts: list[list[int]], steps: int, output_len: int
           ) -> tuple[list[tuple[str, torch.Tensor]], list[list[int]]]:
    """(module name, output) of every module call during the first `steps` engine steps (none under CUDA
    graphs: replays call no module), and the tokens."""
    model = llm.engine.runner.model
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules() if llm.engine.runner.graphs is None else ():
        def hook(_m, _inp, out, name=name):  # noqa: ANN001, ANN202
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():  # not slot ids: pages differ
                calls.append((name or "model", first.detach().clone()))
        handles.append(module.register_forward_hook(hook))
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rids = [f"det-{id(calls)}-{i}" for i in range(len(prompts))]
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    tokens = {rid: [] for rid in rids}
    try:
        for _ in range(steps):
            for out in engine.step():
                tokens[out.rid] += out.new_token_ids
    finally:
        for h in handles:
            h.remove()
    while engine.has_work():
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
    return calls, [tokens[r] for r in rids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dsaserve-determinism-model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="engine steps whose module outputs are compared")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs on (tokens compared only)")
    args = ap.parse_args()
    path = Path(args.out)
    if not (path / "config.json").is_file():
        make_tiny_model(path, "deepseek_v32", layers=args.layers, dtype=torch.bfloat16,
                        n_routed_experts=args.experts, **DEEPSEEK_V32_LAYER)
    llm = LLM(str(path), page_size=64, disable_radix_cache=True, cuda_graph_max_bs=args.batch if args.graphs else 0,
              max_total_tokens=args.batch * (args.input_len + args.output_len + 16) + 4096)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, DEEPSEEK_V32_LAYER["vocab_size"], (args.input_len,), generator=gen).tolist()
               for _ in range(args.batch)]
    first, tokens_a = record(llm, prompts, args.steps, args.output_len)
    second, tokens_b = record(llm, prompts, args.steps, args.output_len)
    same = sum(a == b for a, b in zip(tokens_a, tokens_b))
    parted = sorted(next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                    for a, b in zip(tokens_a, tokens_b) if a != b)
    print(f"batch {args.batch}: {same}/{args.batch} requests with equal tokens (others part at {parted}); "
          f"{len(first)} vs {len(second)} module calls recorded")
    for i, ((name, a), (name_b, b)) in enumerate(zip(first, second)):
        if name != name_b or a.shape != b.shape or not torch.equal(a, b):
            rows = (a != b).flatten(1).any(1).nonzero().flatten().tolist() if a.shape == b.shape else "shape"
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else "-"
            print(f"first difference: call {i}, module {name!r} (vs {name_b!r}), shape {tuple(a.shape)}, "
                  f"rows {rows}; max |diff| {diff}")
            prev = [n for n, _ in first[max(0, i - 4):i]]
            print(f"  the calls before it agreed: {prev}")
            return
    print("every recorded module output is bitwise equal")


if __name__ == "__main__":
    main()
