"""bench/flops.prefill_flops against what a real prefill step of the tiny models computes, on CPU.

One engine step prefills a whole prompt (with MTP speculation: also the MTP pass and the chained draft
rows) under torch's FlopCounterMode. The CPU reference ops do more matmul work than the model math in two
places: sparse_mla scores every one of the index_topk slots of a row (masked), and indexer_logits scores
all key_width positions of every row (masked past the causal ones). So the step is compared in parts:

* weight products and lm_head: FlopCounterMode's count of the whole step minus what it counted inside
  those two ops: exact, so it fails if, e.g., every routed expert or no shared expert were counted;
* attention: from the selection the step really made, 2 x (valid slots of each row, as the op reads
  them) x heads x (score width + value width), from the tensors each call received;
* indexer scores: 2 x (row_kv_len of each scored row) x heads x head dim, from each call's arguments.

Prompts are shorter and longer than index_topk (16): past it the attention must stop at index_topk keys
and the indexer's query side and scores must run, before it neither."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ARCHS
from dsaserve import LLM, SamplingParams
from dsaserve.bench.flops import prefill_flop_parts, prefill_flops
from dsaserve.config import ModelConfig
from dsaserve.model.loader import fp8_by_config, meta_model
from dsaserve.ops import reference
from dsaserve.parallel.groups import Parallel, ParallelConfig


@dataclass
class Measured:
    total: int = 0  # every matmul of the step
    inside_ops: int = 0  # counted inside sparse_mla and indexer_logits
    attention: int = 0  # from the selected slots
    indexer: int = 0  # from the causal keys of the scored rows


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Measured]:
    m, mla, logits = Measured(), reference.sparse_mla, reference.indexer_logits

    def counted(fn: Callable[..., object], *args: object) -> object:  # nested: the outer counter sees them too
        with FlopCounterMode(display=False) as inner:
            out = fn(*args)
        m.inside_ops += inner.get_total_flops()
        return out

    def sparse_mla(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float, v_dim: int,
                   lengths: torch.Tensor | None = None) -> object:
        valid = indices >= 0
        if lengths is not None:
            valid &= torch.arange(indices.shape[1]) < lengths.reshape(-1, 1)
        m.attention += 2 * int(valid.sum()) * q.shape[1] * (q.shape[2] + v_dim)
        return counted(mla, q, cache, indices, scale, v_dim, lengths)

    def indexer_logits(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor, table: torch.Tensor,
                       row_req: torch.Tensor, row_kv_len: torch.Tensor, page_size: int, num_keys: int,
                       rows_per_request: int = 1) -> object:
        m.indexer += 2 * int(row_kv_len.sum()) * q.shape[1] * q.shape[2]
        return counted(logits, q, weights, cache, table, row_req, row_kv_len, page_size, num_keys, rows_per_request)

    monkeypatch.setattr(reference, "sparse_mla", sparse_mla)
    monkeypatch.setattr(reference, "indexer_logits", indexer_logits)
    yield m


@pytest.fixture(scope="module", params=[(a, s) for a in ARCHS for s in (0, 3)], ids=lambda p: f"{p[0]}-spec{p[1]}")
def engine_spec(request: pytest.FixtureRequest, tiny_models: dict[str, str]) -> tuple[LLM, int]:
    arch, spec = request.param
    llm = LLM(tiny_models[arch], page_size=4, max_total_tokens=2048, disable_overlap_schedule=True,
              disable_radix_cache=True, skip_server_warmup=True,
              speculative_algorithm="NEXTN" if spec else None, speculative_num_steps=spec or None)
    return llm, spec


@pytest.mark.parametrize("prompt_len", [9, 15, 40])  # 15 with 3 MTP steps: the last draft row sees 17 keys
def test_prefill_flops_match_a_counted_prefill(engine_spec: tuple[LLM, int], prompt_len: int,
                                               measured: Measured) -> None:
    llm, spec = engine_spec
    engine, cfg = llm.engine, llm.engine.cfg
    assert cfg.index_topk == 16 and cfg.n_shared_experts and cfg.num_experts_per_tok < cfg.n_routed_experts
    prompt = torch.randint(5, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    engine.add_request(f"p{prompt_len}", prompt.tolist(), SamplingParams(max_tokens=1, temperature=0.0))
    with FlopCounterMode(display=False) as counter:
        outputs = engine.step()  # the whole prompt in one step: its first token comes out
    engine.run_until_idle()
    assert [len(o.new_token_ids) for o in outputs] == [1]
    measured.total = counter.get_total_flops()

    parts = prefill_flop_parts(engine.runner.model, prompt_len, spec)
    assert measured.total - measured.inside_ops == parts["linear"] + parts["lm_head"]
    assert measured.attention == parts["attention"]
    assert measured.indexer == parts["indexer"]
    assert prefill_flops(engine.runner.model, prompt_len, spec) == sum(parts.values())
    if prompt_len > cfg.index_topk:  # selection active: fewer keys than causal attention would read
        assert parts["indexer"] > 0
    elif prompt_len + spec - 1 <= cfg.index_topk:
        assert parts["indexer"] == 0


def test_fp8_counts_logical_shapes_and_tp_counts_one_rank(tiny_ds: str) -> None:
    """FP8 weights (e4m3, experts padded to whole 128-blocks on the tiny model) count as their bf16 shapes;
    under --tp 2 one rank holds half of the heads (attention halves) and scores the even rows of a 40-row
    prompt (the indexer's rows are split over the attention group: its scores and query side by row)."""
    cfg = ModelConfig.from_path(tiny_ds)
    fp8_cfg = ModelConfig.from_dict({**cfg.raw, "quantization_config": {"quant_method": "fp8"}})

    def model(c: ModelConfig, tp: int = 1) -> torch.nn.Module:
        return meta_model(c, Parallel.without_groups(ParallelConfig(tp)), torch.bfloat16, False, fp8_by_config(c))

    one, fp8 = model(cfg), model(fp8_cfg)
    assert any(getattr(m, "padded", False) for m in fp8.modules())
    assert prefill_flop_parts(fp8, 40) == prefill_flop_parts(one, 40)
    full, half = prefill_flop_parts(one, 40), prefill_flop_parts(model(cfg, 2), 40)
    keys = sum(p + 1 for p in range(40))  # one layer's indexer (row, key) pairs, each row p seeing p + 1 keys
    assert half["attention"] == full["attention"] / 2
    assert half["indexer"] == full["indexer"] * sum(p + 1 for p in range(0, 40, 2)) / keys
    assert half["lm_head"] == full["lm_head"] / 2 and full["linear"] / 2 < half["linear"] < full["linear"]
