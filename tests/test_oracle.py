"""Oracle parity: dsaserve vs transformers' DeepseekV32ForCausalLM / GlmMoeDsaForCausalLM, fp32 on CPU.

Tolerance: max |logit difference| < 1e-4 at every prompt position (logits are O(1); observed ~3e-6).
Prompts are shorter and longer than index_topk (16), so sparse selection is active.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from conftest import ARCHS, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
from dsaserve.model.dsa import MoE
from dsaserve.tiny import make_tiny_model

LOGIT_TOL = 1e-4
ORACLES = {"deepseek_v32": transformers.DeepseekV32ForCausalLM, "glm_moe_dsa": transformers.GlmMoeDsaForCausalLM}


@pytest.fixture(scope="module")
def oracles(tiny_models: dict[str, str]) -> dict[str, torch.nn.Module]:
    transformers.logging.set_verbosity_error()
    return {a: ORACLES[a].from_pretrained(tiny_models[a], dtype=torch.float32, attn_implementation="eager").eval()
            for a in ARCHS}


def test_tiny_configs_exercise_selection(tiny_models: dict[str, str]) -> None:
    from dsaserve.config import ModelConfig
    for arch in ARCHS:
        cfg = ModelConfig.from_path(tiny_models[arch])
        assert cfg.index_n_heads >= 32 and cfg.index_topk == 16
        assert cfg.mlp_layer_types.count("sparse") >= 2
    ds = ModelConfig.from_path(tiny_models["deepseek_v32"])
    assert ds.n_group > 1 and ds.rope.kind == "yarn"
    glm = ModelConfig.from_path(tiny_models["glm_moe_dsa"])
    assert glm.indexer_rope_interleave and "shared" in glm.indexer_types  # cross-layer top-k sharing


def _prefill_logit_diff(llm: LLM, oracle: torch.nn.Module, ids: list[int], page_size: int) -> float:
    """Max |logit difference| of one prompt's prefill against the oracle's, every position."""
    runner = llm.engine.runner
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0]
    pages = tuple(llm.engine.allocator.alloc(-(-len(ids) // page_size)))
    plan = StepPlan(StepMode.EXTEND, ("r",), (pages,), (0,), (len(ids),), (1,), (True,), tuple(ids), (0,))
    layout = BatchLayout.build(plan, page_size, runner.device)
    with torch.no_grad():
        got = runner.model.logits(runner.model(torch.tensor(ids), layout, runner.pools, runner.ops))
    llm.engine.allocator.free(list(pages))
    return (got - expected).abs().max().item()


def _moe_layers(llm: LLM) -> list[MoE]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, MoE)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size", [1, 64])
def test_prefill_logits_match_transformers(arch: str, page_size: int, tiny_models: dict[str, str],
                                           oracles: dict[str, torch.nn.Module]) -> None:
    llm = LLM(tiny_models[arch], page_size=page_size, max_total_tokens=4096)
    # the one shared expert runs stacked with the routed ones (MoE.fuse_shared_expert)
    assert all(m.shared_experts is None and m.experts.shared_slot == 8 for m in _moe_layers(llm))
    for ids in prompts_ids(3, [9, 16, 45], seed=1):  # below, at and above index_topk
        diff = _prefill_logit_diff(llm, oracles[arch], ids, page_size)
        assert diff < LOGIT_TOL, f"{arch} len={len(ids)}: max logit diff {diff:.2e} >= {LOGIT_TOL}"


def test_two_shared_experts_stay_a_dense_mlp(tmp_path: Path) -> None:
    """Two shared experts (twice a routed expert's width) are not stacked: they run as a dense MLP beside the
    routed experts, and the model still gives transformers' logits."""
    path = make_tiny_model(tmp_path / "two_shared", "deepseek_v32", n_shared_experts=2)
    oracle = ORACLES["deepseek_v32"].from_pretrained(str(path), dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    llm = LLM(str(path), page_size=1, max_total_tokens=4096)
    assert all(m.shared_experts is not None and m.experts.shared_slot is None for m in _moe_layers(llm))
    ids = prompts_ids(1, [45], seed=1)[0]
    diff = _prefill_logit_diff(llm, oracle, ids, 1)
    assert diff < LOGIT_TOL, f"max logit diff {diff:.2e} >= {LOGIT_TOL}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size,chunk", [(64, 8192), (1, 7)])
def test_greedy_continuation_matches_transformers(arch: str, page_size: int, chunk: int,
                                                  tiny_models: dict[str, str],
                                                  oracles: dict[str, torch.nn.Module]) -> None:
    prompts = prompts_ids(3, [5, 14, 30], seed=2)
    llm = LLM(tiny_models[arch], page_size=page_size, chunked_prefill_size=chunk, max_total_tokens=4096)
    got = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, got):
        with torch.no_grad():
            ref = oracles[arch].generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                         do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref, f"{arch}: prompt of {len(ids)} tokens diverged from transformers"


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers(arch: str, tiny_models: dict[str, str],
                                            oracles: dict[str, torch.nn.Module]) -> None:
    """Every prompt token after the first is scored once (chunked prefill of 7, speculation on): its
    log-probability and the top-2 equal transformers' log-softmax."""
    llm = LLM(tiny_models[arch], page_size=4, chunked_prefill_size=7, max_total_tokens=4096,
              speculative_algorithm="NEXTN", speculative_num_steps=2)
    prompts = prompts_ids(2, [45, 9], seed=3)
    for i, ids in enumerate(prompts):
        llm.engine.add_request(f"p{i}", ids, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    got = {o.rid: o.prompt_logprobs for o in llm.engine.run_until_idle() if o.prompt_logprobs is not None}
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            expected = torch.log_softmax(oracles[arch](torch.tensor([ids])).logits[0, :-1], dim=-1)
        scored = got[f"p{i}"]
        assert len(scored) == len(ids) - 1
        chosen = torch.tensor([lp for lp, _ in scored])
        assert (chosen - expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max() < LOGIT_TOL
        for (_, top), row in zip(scored, expected):
            assert [t for t, _ in top] == row.topk(2).indices.tolist()


@pytest.mark.parametrize("pattern", [{"index_topk_pattern": "FSFSSF"}, {"indexer_types": ["full", "shared"] * 3},
                                     {"mlp_layer_types": ["dense", "sparse", "dense"] + ["sparse"] * 3}])
def test_glm_layer_patterns_given_in_the_config_match_transformers(pattern: dict, tmp_path: Path) -> None:
    """make_tiny_model gives indexer and MLP weights to the layers config.json's pattern or list names (it followed
    index_topk_freq and first_k_dense_replace alone, so such a checkpoint did not load), and shared layers after
    shared layers reuse the last full layer's top-k as transformers does."""
    path = make_tiny_model(tmp_path / "glm", "glm_moe_dsa", layers=6, **pattern)
    oracle = ORACLES["glm_moe_dsa"].from_pretrained(str(path), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    llm = LLM(str(path), page_size=1, max_total_tokens=4096)
    cfg = llm.engine.runner.model.cfg
    assert (cfg.indexer_types, cfg.mlp_layer_types) == (tuple(oracle.config.indexer_types),
                                                         tuple(oracle.config.mlp_layer_types))
    diff = _prefill_logit_diff(llm, oracle, prompts_ids(1, [45], seed=1)[0], 1)
    assert diff < LOGIT_TOL, f"max logit diff {diff:.2e} >= {LOGIT_TOL}"


def test_indexer_weights_of_layers_the_config_makes_shared_are_not_loaded(tmp_path: Path) -> None:
    """IndexCache applied by config.json alone (index_topk_freq set on a checkpoint whose every layer has an indexer,
    as vLLM's --hf-overrides does): the shared layers' indexer tensors are left unused, as transformers leaves them
    (the load used to fail on the first one as an unexpected tensor)."""
    path = make_tiny_model(tmp_path / "glm", "glm_moe_dsa", layers=4, index_topk_freq=1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "index_topk_freq": 2}))
    oracle = ORACLES["glm_moe_dsa"].from_pretrained(str(path), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    llm = LLM(str(path), page_size=1, max_total_tokens=4096)
    assert llm.engine.runner.model.cfg.indexer_types == ("full", "full", "shared", "full")
    diff = _prefill_logit_diff(llm, oracle, prompts_ids(1, [45], seed=1)[0], 1)
    assert diff < LOGIT_TOL, f"max logit diff {diff:.2e} >= {LOGIT_TOL}"
