"""The embedded default model (dsaserve/assets/tiny-dsa), trained by `dsaserve train-tiny`.

* The training script runs end to end at toy scale (every stage, export, report) and learns; transformers
  loads each preset's config without a rope warning.
* The shipped checkpoint equals transformers' DeepseekV32ForCausalLM like any other checkpoint
  (fp32 logits within LOGIT_TOL at prompts below and far above index_topk; greedy tokens equal).
* MTP speculative decoding with one draft step accepts more than MTP_ACCEPT_FLOOR tokens per verify
  step, and the engine's counts equal those of the training module replaying the same greedy run; with
  three draft steps it accepts more than MTP3_ACCEPT_FLOOR and its tokens are the non-speculative run's.
* On held-out standard-library text, sparse attention (the trained indexer's top-64 keys) stays
  within SPARSE_MARGIN of dense attention at contexts 4x and 8x index_topk, measured by
  transformers (dense: the same model with index_topk >= the context) and by the training module.
"""
from __future__ import annotations

import json
import logging
import math
import platform
from pathlib import Path

import pytest
import torch
import transformers

from dsaserve import LLM, SamplingParams
from dsaserve.config import ModelConfig
from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
from dsaserve.model.checkpoint import default_model_path
from dsaserve.train_tiny import PRESETS, TOKENIZER_FILES, _tokenized_corpus, train_tiny
from dsaserve.train_tiny.corpus import build_corpus, token_stream, windows
from dsaserve.train_tiny.evaluate import mtp_accuracy, selector
from dsaserve.train_tiny.export import load_checkpoint

LOGIT_TOL = 1e-4  # as tests/test_oracle.py
SPARSE_MARGIN = 0.02  # sparse perplexity <= dense * (1 + margin); docs/tiny-model.md states the measured gap
RANDOM_GAP = 0.10  # random top-64 selection is worse than the trained indexer's by more than this (ppl ratio)
MTP_TOP1_FLOOR = 0.20  # next-next-token top-1 of the MTP layer on held-out text (measured: docs/tiny-model.md)
MTP_ACCEPT_FLOOR = 1.6  # engine accept length at --speculative-num-steps 1 (measured 1.85 to 1.87)
MTP3_ACCEPT_FLOOR = 2.5  # at --speculative-num-steps 3 (measured 3.27 on the prompts below, CPU)
PPL_AGREEMENT = 1e-3  # relative: the training module vs transformers on the same windows
CONTEXTS = (256, 512)  # 4x and 8x index_topk
WINDOWS = 6


@pytest.fixture(scope="module")
def shipped() -> str:
    return str(default_model_path())


@pytest.fixture(scope="module")
def held_out(shipped: str) -> torch.Tensor:
    """Held-out docstrings of this interpreter's standard library, in the shipped tokenizer."""
    from tokenizers import Tokenizer
    return token_stream(build_corpus().held_out, Tokenizer.from_file(f"{shipped}/tokenizer.json"))


def _oracle(path: str, **overrides: object) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(path, **overrides)
    return transformers.DeepseekV32ForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, attn_implementation="eager").eval()


def test_training_script_runs_end_to_end_learns_and_reproduces(tmp_path) -> None:
    lines: list[str] = []
    report = train_tiny(tmp_path / "model", preset="test", log=lines.append)
    train_tiny(tmp_path / "again", preset="test", log=lambda line: None)
    for shard in sorted((tmp_path / "model").glob("*.safetensors")):  # seeded: the same bytes again
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes(), shard.name
    vocab = ModelConfig.from_path(tmp_path / "model").vocab_size
    assert any("dense  step" in line for line in lines), "no training progress was printed"
    stages = {row["stage"]: [r for r in report["history"] if r["stage"] == row["stage"]] for row in report["history"]}
    assert set(stages) == {"dense", "warmup", "sparse"}
    assert stages["dense"][-1]["lm"] < stages["dense"][0]["lm"] - 1.0  # from ln(vocab) down by > 1 nat
    assert stages["warmup"][-1]["kl"] < stages["warmup"][0]["kl"]  # the indexer learned the attention
    for row in report["perplexity"]:  # a uniform guess has perplexity = vocab
        assert max(row["all_positions"].values()) < vocab / 3, row
    # The written checkpoint is the trained module: transformers on it gives the module's logits.
    ids = torch.tensor([list(range(5, 5 + 60))])
    with torch.no_grad():
        expected = load_checkpoint(tmp_path / "model")(ids, "sparse").logits
        got = _oracle(str(tmp_path / "model"))(ids).logits
    assert (got - expected).abs().max().item() < LOGIT_TOL


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_transformers_loads_each_presets_config_without_a_rope_warning(preset: str, tmp_path: Path) -> None:
    """transformers warns on every load of a YaRN config whose factor is not max_position_embeddings /
    original_max_position_embeddings (the test preset's was 256 / 512 against a factor of 4)."""
    (tmp_path / "config.json").write_text(json.dumps(PRESETS[preset].config))
    logger, warnings, verbosity = logging.getLogger("transformers"), _Warnings(), transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # _oracle silences transformers for the rest of the session
    logger.addHandler(warnings)
    try:
        transformers.AutoConfig.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(warnings)
        transformers.logging.set_verbosity(verbosity)
    assert not [m for m in warnings.messages if "rope" in m.lower()], warnings.messages


def test_shipped_tokenizer_is_what_the_recipe_writes(shipped: str, tmp_path: Path) -> None:
    """The shipped tokenizer files are byte for byte the recipe's (on the Python that trained it: the corpus is
    its standard library), so rerunning the documented command leaves them unchanged."""
    trained_on = json.loads((Path(shipped) / "training_report.json").read_text())["python"]
    if platform.python_version() != trained_on:
        pytest.skip(f"the shipped corpus is Python {trained_on}'s standard library")
    _tokenized_corpus(PRESETS["shipped"], tmp_path, lambda line: None)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (Path(shipped) / name).read_bytes(), name


def test_default_model_is_the_shipped_trained_model(shipped: str) -> None:
    cfg = ModelConfig.from_path(shipped)
    assert cfg.index_topk == 64 and cfg.index_n_heads >= 4 and cfg.num_nextn_predict_layers == 1
    assert cfg.mlp_layer_types[0] == "dense" and "sparse" in cfg.mlp_layer_types
    llm = LLM()  # no model path: the embedded default
    assert llm.engine.model_path == shipped
    out = llm.generate("Return the", SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert out.text.strip() and "\ufffd" not in out.text, out.text


@pytest.mark.parametrize("length", [40, 200, 500])
def test_shipped_logits_match_transformers(shipped: str, held_out: torch.Tensor, length: int) -> None:
    ids = held_out[1000:1000 + length].tolist()
    with torch.no_grad():
        expected = _oracle(shipped)(torch.tensor([ids])).logits[0]
    llm = LLM(shipped, page_size=64, max_total_tokens=4096)
    runner = llm.engine.runner
    pages = tuple(llm.engine.allocator.alloc(-(-length // 64)))
    plan = StepPlan(StepMode.EXTEND, ("r",), (pages,), (0,), (length,), (1,), (True,), tuple(ids), (0,))
    with torch.no_grad():
        got = runner.model.logits(runner.model(torch.tensor(ids), BatchLayout.build(plan, 64, runner.device),
                                               runner.pools, runner.ops))
    diff = (got - expected).abs().max().item()
    assert diff < LOGIT_TOL, f"{length} tokens: max logit diff {diff:.2e}"


def test_shipped_greedy_matches_transformers(shipped: str, held_out: torch.Tensor) -> None:
    """Across EOS too (a trained model emits it): the oracle is a plain argmax loop, no generate() rules."""
    llm = LLM(shipped, page_size=64, max_total_tokens=4096)
    chat = llm.tokenizer.chat([{"role": "user", "content": "What does json.dumps do?"}])
    prompts = [chat, held_out[3000:3100].tolist()]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    oracle = _oracle(shipped)
    for ids, out in zip(prompts, outs):
        seq = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(24):
                seq = torch.cat([seq, oracle(seq).logits[:, -1:].argmax(-1)], 1)
        assert out.token_ids == seq[0, len(ids):].tolist(), f"prompt of {len(ids)} tokens diverged from transformers"


def _perplexity(model: torch.nn.Module, data: torch.Tensor) -> float:
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(row[None, :-1]).logits[0], row[1:]) for row in data]
    return math.exp(torch.stack(nll).mean().item())


@pytest.mark.parametrize("context", CONTEXTS)
def test_sparse_perplexity_within_margin_of_dense(shipped: str, held_out: torch.Tensor, context: int) -> None:
    data = windows(held_out, context + 1)[:WINDOWS]
    assert data.shape[0] == WINDOWS and context >= 4 * ModelConfig.from_path(shipped).index_topk
    sparse = _perplexity(_oracle(shipped), data)
    dense = _perplexity(_oracle(shipped, index_topk=context), data)  # every key selected
    module = load_checkpoint(shipped)
    with torch.no_grad():
        for mode, oracle_ppl in (("sparse", sparse), ("dense", dense)):
            ours = math.exp(torch.nn.functional.cross_entropy(
                module(data[:, :-1], mode).logits.flatten(0, 1), data[:, 1:].flatten()).item())
            assert abs(ours / oracle_ppl - 1) < PPL_AGREEMENT, (
                f"{mode}: module {ours:.3f} vs transformers {oracle_ppl:.3f}")
    assert sparse <= dense * (1 + SPARSE_MARGIN), f"context {context}: sparse {sparse:.2f} vs dense {dense:.2f}"


def test_indexer_selects_better_than_random_keys(shipped: str, held_out: torch.Tensor) -> None:
    """The trained indexer's top-64 against random top-64 (same budget), at 8x index_topk."""
    data = windows(held_out, 513)[:WINDOWS]
    module = load_checkpoint(shipped)
    ppl = {}
    with torch.no_grad():
        for kind in ("indexer", "random"):
            with selector(module, kind):
                ppl[kind] = math.exp(torch.nn.functional.cross_entropy(
                    module(data[:, :-1], "sparse").logits.flatten(0, 1), data[:, 1:].flatten()).item())
    assert ppl["random"] > ppl["indexer"] * (1 + RANDOM_GAP), ppl


def test_mtp_layer_predicts_the_next_next_token(shipped: str, held_out: torch.Tensor) -> None:
    acc = mtp_accuracy(load_checkpoint(shipped), windows(held_out, 257)[:WINDOWS])
    assert acc["mtp_top1"] > MTP_TOP1_FLOOR, acc


def test_mtp_accept_length_at_one_step(shipped: str, held_out: torch.Tensor) -> None:
    """Engine (NEXTN, S = 1) vs the training module replaying the same run: a verify step drafts at the
    last accepted row r (MTP of h_r and token r+1 predicts token r+2) and moves r on by 2 if accepted."""
    prompts = windows(held_out, 128)[:8].tolist()
    llm = LLM(shipped, speculative_algorithm="NEXTN", speculative_num_steps=1, page_size=64, max_total_tokens=8192)
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    stats = llm.engine.stats()
    module, verifies, accepted = load_checkpoint(shipped), 0, 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            seq = prompt + out.token_ids
            draft = module(torch.tensor([seq]), "sparse").mtp_logits[0].argmax(-1).tolist()
            row = len(prompt) - 1
            while row + 2 < len(seq):
                verifies, hit = verifies + 1, draft[row] == seq[row + 2]
                accepted, row = accepted + hit, row + 1 + hit
    assert abs(stats.spec_verify_steps - verifies) <= 2 and abs(stats.spec_accepted_tokens - accepted) <= 2, (
        f"engine {stats.spec_verify_steps} verify steps / {stats.spec_accepted_tokens} accepted, "
        f"module {verifies} / {accepted}")
    assert stats.avg_spec_accept_length > MTP_ACCEPT_FLOOR, stats.avg_spec_accept_length


def test_mtp_three_steps_accept_chains_and_equal_plain(shipped: str, held_out: torch.Tensor) -> None:
    """S = 3 with the trained drafter: chains of accepted drafts (carried into each verify step on the
    device, engine._fill_drafts) leave the greedy tokens those of the run without speculation."""
    prompts = windows(held_out, 128)[:8].tolist()
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain = [o.token_ids for o in LLM(shipped, page_size=64, max_total_tokens=8192).generate(prompts, params)]
    llm = LLM(shipped, speculative_algorithm="NEXTN", speculative_num_steps=3, page_size=64, max_total_tokens=8192)
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain
    assert llm.engine.stats().avg_spec_accept_length > MTP3_ACCEPT_FLOOR, llm.engine.stats().avg_spec_accept_length
