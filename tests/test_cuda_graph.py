"""Decode CUDA graphs: bucketed batches padded with dummy requests give the same greedy tokens.

On CPU the graph runner runs its padded buckets eagerly (same static buffers, same dummy rows), so
the padding and in-place metadata are proven here; the GPU test captures and replays real graphs.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.cuda_graph import batch_buckets

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = prompts_ids(5, [3, 40, 9, 17, 26], seed=41)  # rows cross index_topk (16) while decoding
SHORT = prompts_ids(3, [2, 5, 4], seed=42)  # every row starts below index_topk


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size", [1, 64])
def test_padded_buckets_match_plain_decode(arch: str, page_size: int, tiny_models: dict[str, str]) -> None:
    common = dict(page_size=page_size, max_total_tokens=4096)
    plain = LLM(tiny_models[arch], **common)
    graphs = LLM(tiny_models[arch], cuda_graph_max_bs=8, **common)
    for prompts in (PROMPTS, SHORT):
        expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
        assert [o.token_ids for o in graphs.generate(prompts, GREEDY)] == expected
    used = set(graphs.engine.runner.graphs.graphs)
    # 5 and 3 requests ran padded to buckets 8 and 4; short rows used the select-all key bucket (16)
    assert {(8, 64), (4, 16)} <= used and any(b == 4 and keys > 16 for b, keys in used), used


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_replay_matches_eager(arch: str, tiny_models: dict[str, str], monkeypatch) -> None:
    common = dict(device="cuda", dtype="float32", attention_backend="triton", moe_backend="triton",
                  page_size=64, max_total_tokens=8192)
    eager = LLM(tiny_models[arch], **common).generate(PROMPTS, GREEDY)
    llm = LLM(tiny_models[arch], cuda_graph_max_bs=8, **common)
    replayed = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in replayed] == [o.token_ids for o in eager]
    assert all(b.graph is not None for b in llm.engine.runner.graphs.graphs.values())


def test_reused_bucket_turns_stale_rows_into_dummies(tiny_ds: str) -> None:
    """Invariant 1 for graphs: rows past the batch are whole dummy requests on the reserved page 0
    (token 0, position 0, one key, writing slot 0), whatever the bucket held before."""
    from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=4096, cuda_graph_max_bs=8)
    graphs = llm.engine.runner.graphs

    def plan(n: int) -> tuple[StepPlan, BatchLayout]:
        pages = tuple((1 + 3 * i, 2 + 3 * i, 3 + 3 * i) for i in range(n))
        p = StepPlan(StepMode.DECODE, tuple(f"r{i}" for i in range(n)), pages, (9,) * n, (1,) * n, (True,) * n,
                     tuple(range(7, 7 + n)))
        return p, BatchLayout.build(p, 4, torch.device("cpu"))

    big, small = plan(7), plan(5)
    graphs.forward(*big)  # the bucket of 8 now holds 7 real rows
    graphs.forward(*small)
    s = graphs.graphs[(8, 16)].layout
    assert s.out_slots[5:].tolist() == [0, 0, 0] and s.row_kv_len[5:, 0].tolist() == [1, 1, 1]
    assert s.row_pos[5:].tolist() == [0, 0, 0] and int(s.page_table[5:].abs().sum()) == 0
    assert graphs.graphs[(8, 16)].input_ids[5:].tolist() == [0, 0, 0]
    assert s.out_slots[:5].tolist() == small[1].out_slots.tolist()
