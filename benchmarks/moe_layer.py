"""The MoE layer as the model runs it (router, routed experts, shared expert) on DeepSeek-V3.2's shapes at a
tensor-parallel rank's width, two ways: the shared expert stacked after the routed ones (the default,
MoE.fuse_shared_expert) and as a dense MLP beside them. Same weights, outputs checked against each other.
With --ep, also every rank of `--tp N --ep N` (expert parallelism: 1/N of the routed experts, whole, the shared
expert a dense MLP split N ways; one router shared by the ranks, random experts of their own) on the same rows:
the slowest rank's time is the layer's, as the all-reduce after it waits for that rank.

    python benchmarks/moe_layer.py [--tp 8 1] [--tokens 1 2 4 8 16 32 64 4096] [--bf16] [--ep] [--out moe_layer.json]

Times are medians of CUDA-graph replays (eager calls above 256 tokens, as the engine prefills) with L2 flushed
before each (benchmarks/kernels.py `bench`). Bytes:
the hit routed experts, the shared expert and the router's fp32 weight; the fraction is of the copy bandwidth
measured in the same run (decode rows are bound by weight bytes). The table is printed last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("dsaserve") is None:  # PYTHONPATH's dsaserve wins (an A/B against a base package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import bench, measure_peaks, profile, rel  # noqa: E402  (benchmarks/kernels.py)

from dsaserve.config import ModelConfig  # noqa: E402
from dsaserve.model import quant  # noqa: E402
from dsaserve.model.dsa import MoE  # noqa: E402
from dsaserve.model.dummy import init_dummy_weights  # noqa: E402
from dsaserve.ops.dispatch import DSAOps  # noqa: E402
from dsaserve.ops.fp8 import FP8  # noqa: E402
from dsaserve.parallel.groups import ParallelConfig  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "deepseek_v32.json"


def build(cfg: ModelConfig, par: ParallelConfig, fp8: bool, stacked: bool, device: str = "cuda") -> MoE:
    """One rank's MoE layer in the engine's formats (fp32 router, e4m3 or bf16 weights), random weights."""
    with torch.device("meta"):
        layer = MoE(cfg, par)
        if fp8:
            for m in layer.modules():
                if isinstance(m, (quant.Linear, quant.Experts)):
                    m.to_fp8((128, 128))
        for name, p in layer.named_parameters():
            if p.dtype != FP8:
                p.data = p.data.to(torch.float32 if name.startswith("gate.") or name.endswith("_scale_inv") else torch.bfloat16)
        if stacked:
            layer.fuse_shared_expert()
            assert layer.experts.shared_slot is not None, "the shared expert did not stack"
        else:
            layer.shared_experts.fuse_gate_up()
    layer.to_empty(device=device)
    init_dummy_weights(layer)
    return layer


def copy_weights(dense: MoE, stacked: MoE) -> None:
    """The dense layer's weights into the stacked one: routed experts, router, and the shared MLP's projections
    into the last slot (Experts.slot, where the loader writes them)."""
    experts, mlp = stacked.experts, dense.shared_experts
    for name, p in dense.named_parameters():
        if not name.startswith("shared_experts."):
            stacked.get_parameter(name).data[: p.shape[0]].copy_(p.data)
    parts = [(proj, mlp.gate_up_proj, start) for proj, start, _ in mlp.gate_up_proj.sources]
    for proj, linear, start in parts + [("down_proj", mlp.down_proj, 0)]:
        weight, scale = experts.slot(proj, experts.shared_slot)
        weight.copy_(linear.weight.data[start:start + weight.shape[0]])
        if scale is not None:
            first = start // linear.block[0]
            scale.copy_(linear.weight_scale_inv.data[first:first + scale.shape[0]])


def layer_bytes(layer: MoE, x: torch.Tensor) -> float:
    """Bytes a call must read: the distinct experts of this rank its rows hit, the shared expert, the router's
    weight."""
    ids, _ = layer.gate(x)
    experts = layer.experts
    per_expert = sum(p[0].numel() * p.element_size() for p in experts.parameters())
    hit = ids[:, : layer.gate.cfg.num_experts_per_tok]
    routed = hit[hit >= 0].unique().numel()  # (-1: another rank's expert)
    mlp = layer.shared_experts
    shared = per_expert if mlp is None else sum(p.numel() * p.element_size() for p in mlp.parameters())
    return routed * per_expert + shared + layer.gate.weight.numel() * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 4096])
    ap.add_argument("--bf16", action="store_true", help="bf16 weights instead of FP8")
    ap.add_argument("--ep", action="store_true", help="also time every rank of --tp N --ep N (the slowest is the "
                                                      "layer's time)")
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    ap.add_argument("--profile", action="store_true", help="print each way's kernels (eager) at every size")
    args = ap.parse_args()
    cfg = ModelConfig.from_dict(json.loads(CONFIG.read_text()))
    peaks = measure_peaks()
    ops = DSAOps(attention_backend="triton", moe_backend="triton")
    rows = []
    for tp in args.tp:
        dense = build(cfg, ParallelConfig(tp), not args.bf16, stacked=False)
        stacked = build(cfg, ParallelConfig(tp), not args.bf16, stacked=True)
        copy_weights(dense, stacked)
        ranks = [build(cfg, ParallelConfig(tp, rank=r, ep=tp), not args.bf16, stacked=False)
                 for r in range(tp if args.ep else 0)]
        for layer in ranks[1:]:  # one router for the deployment
            layer.gate.load_state_dict(ranks[0].gate.state_dict())
        for layer in (dense, stacked, *ranks):
            quant.prepare(layer, "kernels", torch.bfloat16)
        gen = torch.Generator("cuda").manual_seed(tp)
        for n in args.tokens:
            x = torch.randn(n, cfg.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
            with torch.no_grad():
                err = rel(stacked(x, ops), dense(x, ops))
                assert err < 2e-2, f"tp {tp}, {n} tokens: stacked and dense outputs differ (rel {err:.1e})"
                # prefill-sized rows run eagerly in the engine (and the routing layout sizes itself on the host)
                us = {name: 1e3 * bench(lambda layer=layer: layer(x, ops), graph=n <= 256)
                      for name, layer in (("dense", dense), ("stacked", stacked))}
                nbytes = layer_bytes(dense, x)
                for name, layer in (("dense", dense), ("stacked", stacked)) if args.profile else ():
                    profile(f"tp {tp}, {n} tokens, {name}", lambda layer=layer: layer(x, ops))
                per_rank = [(1e3 * bench(lambda layer=layer: layer(x, ops), graph=n <= 256), layer_bytes(layer, x))
                            for layer in ranks]
                if per_rank:
                    us["ep"], ep_bytes = max(per_rank)
            row = dict(tp=tp, tokens=n, dense_us=us["dense"], stacked_us=us["stacked"], bytes=nbytes, rel_err=err,
                       dense_of_copy=nbytes / (us["dense"] * 1e-6) / peaks["copy_GBps"] / 1e9,
                       stacked_of_copy=nbytes / (us["stacked"] * 1e-6) / peaks["copy_GBps"] / 1e9)
            if per_rank:
                row.update(ep_mean_us=sum(t for t, _ in per_rank) / len(per_rank), ep_us=us["ep"], ep_bytes=ep_bytes,
                           ep_of_copy=ep_bytes / (us["ep"] * 1e-6) / peaks["copy_GBps"] / 1e9)
            rows.append(row)
            print(row, flush=True)
        del dense, stacked, ranks
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {'bf16' if args.bf16 else 'FP8'} weights, copy {peaks['copy_GBps']:.0f} GB/s")
    print("| TP | tokens | MB read | shared as dense MLP | stacked | change | EP: slowest rank's MB | slowest rank "
          "| mean rank |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ep = (f"{r['ep_bytes'] / 1e6:.1f} | {r['ep_us']:.1f} us ({r['ep_of_copy']:.0%}) | "
              f"{r['ep_mean_us']:.1f} us" if "ep_us" in r else "- | - | -")
        print(f"| {r['tp']} | {r['tokens']} | {r['bytes'] / 1e6:.1f} | {r['dense_us']:.1f} us "
              f"({r['dense_of_copy']:.0%}) | {r['stacked_us']:.1f} us ({r['stacked_of_copy']:.0%}) | "
              f"{r['stacked_us'] / r['dense_us'] - 1:+.1%} "
              f"| {ep} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), peaks=peaks, rows=rows), indent=1))


if __name__ == "__main__":
    main()
