"""The reported deployment, end to end on GPUs: a GLM-5-shaped checkpoint (GLM-5's per-layer widths from
transformers' GlmMoeDsaConfig, few layers and experts, one MTP layer, FP8 weights) served with

    dsaserve serve --tp T --dp D --enable-dp-attention --cuda-graph-max-bs 2 --speculative-algorithm NEXTN
      --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 --page-size 1
      --served-model-name GLM-5-FP8-DEBUG

then the asymmetric client (1 request pinned to DP rank 0 and 3 to rank 1, and the reverse), greedy
tokens compared with a --tp 1 run of the same checkpoint, and `dsaserve bench serving` (200 requests,
concurrency 32). Prints a summary and writes JSON:

    python benchmarks/deployment.py --tp 2 --dp 2 --out /tmp/deploy
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import ServerProcess  # noqa: E402

from dsaserve import LLM, SamplingParams  # noqa: E402
from dsaserve.tiny import make_tiny_model  # noqa: E402

NAME = "GLM-5-FP8-DEBUG"
MAX = 32


def glm5_shaped(out: Path, layers: int, experts: int, vocab: int, tiny: bool) -> Path:
    if tiny:  # a smoke run of this script on CPU: the tiny GLM-shaped model
        return make_tiny_model(out, "glm_moe_dsa", layers=layers)  # bf16: tiny dims split inside FP8 blocks
    ref = transformers.GlmMoeDsaConfig()
    dims = {k: getattr(ref, k) for k in (
        "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads", "q_lora_rank",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_shared_experts",
        "num_experts_per_tok", "index_n_heads", "index_head_dim", "index_topk", "routed_scaling_factor")}
    dims |= dict(num_key_value_heads=ref.num_attention_heads, n_routed_experts=experts, n_group=1, topk_group=1,
                 vocab_size=vocab, max_position_embeddings=8192, num_nextn_predict_layers=1)
    if not (out / "config.json").is_file():
        make_tiny_model(out, "glm_moe_dsa", fp8=True, layers=layers, dtype=torch.bfloat16, **dims)
    return out


async def routed(url: str, prompts: list[list[int]], ranks: list[int]) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

    async def one(prompt: list[int], rank: int) -> list[int]:
        r = await client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX, temperature=0, logprobs=0,
                                            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True,
                                                        "routed_dp_rank": rank})
        return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]

    try:
        return list(await asyncio.gather(*(one(p, r) for p, r in zip(prompts, ranks))))
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--out", default="/tmp/dsaserve-deploy")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke run of the script)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = str(glm5_shaped(out / "ckpt", args.layers, args.experts, args.vocab, args.tiny))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    print(f"checkpoint ready in {time.perf_counter() - t:.0f}s", flush=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (40, 300, 2100, 900)]
    llm = LLM(model, page_size=1, max_total_tokens=16384)
    reference = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX, temperature=0.0,
                                                                           ignore_eos=True))]
    del llm
    torch.cuda.empty_cache()
    flags = dict(tp=args.tp, dp=args.dp, enable_dp_attention=True, cuda_graph_max_bs=2, speculative_algorithm="NEXTN",
                 speculative_num_steps=3, speculative_eagle_topk=1, speculative_num_draft_tokens=4, page_size=1,
                 served_model_name=NAME, max_total_tokens=65536, startup_timeout=400)
    result: dict = {"tp": args.tp, "dp": args.dp, "layers": args.layers, "experts": args.experts, "vocab": args.vocab}
    with ServerProcess(model, out / "server.log", **flags) as srv:
        result["startup_s"] = round(time.perf_counter() - t, 1)
        loads = {"1:3": [0, 1, 1, 1], "3:1": [1, 0, 0, 0]}
        result["asymmetric"] = {}
        for name, ranks in loads.items():
            got = asyncio.run(routed(srv.url, prompts, ranks))
            same = [g == r for g, r in zip(got, reference)]
            prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), MAX) for g, r in zip(got, reference)]
            result["asymmetric"][name] = {"all_returned": all(len(g) == MAX for g in got), "equal_to_tp1": same,
                                          "first_difference": prefix}
        bench = out / "bench.json"
        subprocess.run([sys.executable, "-m", "dsaserve", "bench", "serving", "--base-url", srv.url,
                        "--num-prompts", "200", "--max-concurrency", "32", "--input-len", "512", "--output-len",
                        "128", "--vocab-size", str(vocab), "--output-json", str(bench), "--disable-tqdm"],
                       check=True, timeout=400)
        result["bench"] = json.loads(bench.read_text())
        info = httpx.get(f"{srv.url}/get_server_info", timeout=30).json()
        result["ranks"] = [{k: r.get(k) for k in ("dp_rank", "avg_spec_accept_length", "spec_verify_steps",
                                                   "num_retractions")} for r in info["internal_states"]]
    log = srv.log()
    result["rank_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    (out / "deployment.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=1))
    b = result["bench"]
    print({k: b.get(k) for k in ("completed", "failed", "output_throughput", "median_tpot_ms", "p99_itl_ms",
                                 "avg_spec_accept_length") if k in b})


if __name__ == "__main__":
    main()
