"""End-to-end engine benchmark: prefill throughput and decode step time of the offline engine.

Builds a random checkpoint with DeepSeek-V3.2's per-layer shapes (hidden 7168, 128 MLA heads,
latent 512 + 64, indexer 64 x 128 with top-k 2048, MoE 2048-wide experts, top-8 of n_group 8)
but few layers and experts, so it fits one GPU and is made in seconds. Prints a table and writes
JSON. Example (GPU):

    python benchmarks/engine.py --out /tmp/bench-model --batch 1 16 64 --input-len 1024 --output-len 64

With --fp8 the checkpoint stores its linear and expert weights as e4m3 with 128x128 weight_scale_inv
blocks (as the official one does), and the engine serves them as FP8 (default --out gets an -fp8 suffix).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dsaserve import LLM
from dsaserve.bench.one_batch import copy_bandwidth, decode_lead, run_one
from dsaserve.bench.profile import print_decode_profile
from dsaserve.tiny import make_tiny_model

DEEPSEEK_V32_LAYER = dict(
    vocab_size=32768, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_shared_experts=1,
    num_experts_per_tok=8, n_group=8, topk_group=4, index_n_heads=64, index_head_dim=128,
    index_topk=2048, max_position_embeddings=163840, num_nextn_predict_layers=0,
    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def compare_moe_paths(llm: LLM, batch: int, input_len: int, rounds: int) -> None:
    """Prefill throughput with each MoE path in turn, in one process (each run draws its own prompts: the
    output length seeds them, so nothing is a prefix-cache hit)."""
    from dsaserve.ops.triton import moe
    run_one(llm.engine, batch, input_len, 2, None)  # compiles both shapes' kernels of the default path
    results: dict[str, list[float]] = {"gluon (default)": [], "triton (wgmma 0)": []}
    for i in range(2 * rounds):
        name = list(results)[i % 2]
        moe.CONFIG = None if i % 2 == 0 else {"wgmma": 0}
        try:
            results[name].append(run_one(llm.engine, batch, input_len, 3 + i, None).prefill_tok_s)
        finally:
            moe.CONFIG = None
    for name, tok_s in results.items():
        print(f"MoE path {name:17s} prefill tok/s: {' '.join(f'{t:,.0f}' for t in tok_s)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dsaserve-bench-model")
    ap.add_argument("--layers", type=int, default=3, help="first is dense, the rest MoE")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--backend", default="auto", help="torch or triton (auto: triton on cuda)")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--profile", action="store_true", help="print the kernels of 8 decode steps at each --batch")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None,
                    help="replay decode from CUDA graphs (default: the engine's, 64 on CUDA; 0: off)")
    ap.add_argument("--fp8", action="store_true", help="an FP8 checkpoint (e4m3, 128x128 block scales)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, bf16 or fp8_e4m3 (the server flag)")
    ap.add_argument("--compare-moe-paths", type=int, default=0, metavar="ROUNDS",
                    help="instead: prefill tok/s with the FP8 MoE's Gluon path and without (moe CONFIG wgmma 0), "
                         "alternating for ROUNDS rounds at the largest --batch (uncached prompts)")
    args = ap.parse_args()
    path = Path(args.out + "-fp8" if args.fp8 and args.out == ap.get_default("out") else args.out)
    if not (path / "config.json").is_file():
        t = time.perf_counter()
        make_tiny_model(path, "deepseek_v32", fp8=args.fp8, layers=args.layers, dtype=torch.bfloat16,
                        n_routed_experts=args.experts, **DEEPSEEK_V32_LAYER)
        print(f"made the benchmark checkpoint in {time.perf_counter() - t:.0f}s")
    if ("quantization_config" in json.loads((path / "config.json").read_text())) != args.fp8:
        raise SystemExit(f"{path} holds a checkpoint {'without' if args.fp8 else 'with'} FP8 weights: use another --out")
    batch, chunk = max(args.batch), max(8192, args.input_len)
    longest = args.input_len + args.output_len + decode_lead(batch, args.input_len, chunk)
    tokens = batch * (longest + args.page_size) + 4096
    llm = LLM(str(path), page_size=args.page_size, max_total_tokens=tokens, attention_backend=args.backend,
              moe_backend=args.backend, max_running_requests=batch, chunked_prefill_size=chunk,
              cuda_graph_max_bs=args.cuda_graph_max_bs, kv_cache_dtype=args.kv_cache_dtype)
    rows = []
    bandwidth = copy_bandwidth(llm.engine.runner.device) if torch.cuda.is_available() else None
    if args.compare_moe_paths:
        compare_moe_paths(llm, max(args.batch), args.input_len, args.compare_moe_paths)
        return
    for b in args.batch:  # the same timing as `dsaserve bench one-batch`; each shape once before it is timed
        run_one(llm.engine, b, args.input_len, 4, bandwidth)
        rows.append(asdict(run_one(llm.engine, b, args.input_len, args.output_len, bandwidth)))
    for b in args.batch if args.profile else []:
        print_decode_profile(llm.engine, b, args.input_len)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    max_bs = llm.engine.runner.graphs.max_bs if llm.engine.runner.graphs else 0
    graphs = f", decode CUDA graphs up to batch {max_bs}" if max_bs else ""
    weights = "FP8 weights" if args.fp8 else f"{llm.engine.runner.dtype} weights"
    print(f"\n{device}, {args.layers} layers ({args.experts} experts), {weights}, KV {llm.engine.runner.kv_dtype}, "
          f"backend {llm.engine.runner.ops.attention_backend}{graphs}")
    print(f"{'batch':>5} {'in':>6} {'out':>5} {'prefill s':>10} {'prefill tok/s':>14} {'decode ms/step':>15} "
          f"{'decode tok/s':>13} {'roofline':>9}")
    for r in rows:
        roof = f"{100 * r['roofline']:.1f}%" if r["roofline"] is not None else "-"
        print(f"{r['batch']:>5} {r['input_len']:>6} {r['output_len']:>5} {r['prefill_s']:>10.3f} "
              f"{r['prefill_tok_s']:>14.0f} {r['decode_step_ms']:>15.2f} {r['decode_tok_s']:>13.0f} {roof:>9}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "layers": args.layers, "experts": args.experts,
                                                      "fp8": args.fp8, "kv_cache_dtype": args.kv_cache_dtype,
                                                      "cuda_graph_max_bs": args.cuda_graph_max_bs, "rows": rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
