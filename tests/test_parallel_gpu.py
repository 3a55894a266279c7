"""TP and DP attention over NCCL on CUDA: greedy tokens equal the single-GPU run (fp32, torch ops)."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.parallel.launch import Job, OfflineRequest, run_jobs
from dsaserve.server_args import ServerArgs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
COMMON = dict(device="cuda", dtype="float32", attention_backend="torch", moe_backend="torch",
              max_total_tokens=4096)


@pytest.mark.parametrize("dp", [1, 2])
def test_nccl_tp2_matches_single_gpu(dp: int, tiny_models: dict[str, str]) -> None:
    prompts = prompts_ids(4, [6, 33, 17, 2], seed=21)
    jobs, expected = [], []
    for model in tiny_models.values():
        for page_size in (1, 64):
            llm = LLM(model, page_size=page_size, **COMMON)
            expected.append([c.token_ids for c in llm.generate(prompts, GREEDY)])
            del llm
            jobs.append(Job({"model_path": model, "page_size": page_size},
                            [OfflineRequest(p, GREEDY, dp_rank=i % dp) for i, p in enumerate(prompts)]))
    results = run_jobs(ServerArgs(tp=2, dp=dp, enable_dp_attention=dp > 1, **COMMON), jobs)
    assert results == expected


def test_nccl_tp2_with_cuda_graphs_matches_single_gpu(tiny_ds: str) -> None:
    """All-reduces and the vocab all-gather captured inside decode graphs on both ranks."""
    prompts = prompts_ids(5, [6, 33, 17, 2, 9], seed=22)
    common = {**COMMON, "attention_backend": "triton", "moe_backend": "triton", "page_size": 64}
    expected = [c.token_ids for c in LLM(tiny_ds, **common).generate(prompts, GREEDY)]
    job = Job({"model_path": tiny_ds}, [OfflineRequest(p, GREEDY) for p in prompts])
    assert run_jobs(ServerArgs(tp=2, cuda_graph_max_bs=8, **common), [job]) == [expected]


def test_nccl_dp_attention_with_graphs_and_spec_matches_single_gpu(tiny_models: dict[str, str]) -> None:
    """--tp 2 --dp 2 --enable-dp-attention with MTP (S = 3) and CUDA graphs (global buckets, an idle group
    replaying dummies), requests 1:3 and 0:4 over the groups: tokens equal one GPU without speculation."""
    prompts = prompts_ids(4, [6, 33, 17, 2], seed=23)
    common = {**COMMON, "attention_backend": "triton", "moe_backend": "triton", "page_size": 1}
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=3, cuda_graph_max_bs=2)
    jobs, expected = [], []
    for model in tiny_models.values():
        expected.append([c.token_ids for c in LLM(model, cuda_graph_max_bs=0, **common).generate(prompts, GREEDY)])
        for ranks in ([0, 1, 1, 1], [1, 1, 1, 1]):
            jobs.append(Job({"model_path": model, **spec},
                            [OfflineRequest(p, GREEDY, dp_rank=r) for p, r in zip(prompts, ranks)]))
    results = run_jobs(ServerArgs(tp=2, dp=2, enable_dp_attention=True, **common), jobs)
    assert results == [e for e in expected for _ in range(2)]
