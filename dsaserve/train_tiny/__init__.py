"""`dsaserve train-tiny`: train the embedded default model on CPU, from the standard library's docstrings.

One reproducible run (fixed seed, fixed thread count) builds the corpus and a byte-level BPE
tokenizer, trains a DeepSeek-V3.2-architecture model with DSA's recipe (recipe.py), and writes it in
the official checkpoint format with a report of held-out perplexity (dense vs sparse) and MTP
accuracy. The shipped model is `dsaserve/assets/tiny-dsa`; docs/tiny-model.md has its numbers.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dsaserve.config import ModelConfig
from dsaserve.replace_folder import Writer, check_replaceable, replacing
from dsaserve.tiny import SPECIALS, _save_tokenizer, checkpoint_folder
from dsaserve.train_tiny.corpus import build_corpus, token_stream
from dsaserve.train_tiny.evaluate import report, samples
from dsaserve.train_tiny.export import round_to_stored, write_checkpoint
from dsaserve.train_tiny.model import TinyDSA
from dsaserve.train_tiny.recipe import Optim, Stage, train

SHIPPED_CONFIG: dict[str, Any] = dict(
    architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", vocab_size=4096, hidden_size=128,
    intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, scoring_func="sigmoid",
    topk_method="noaux_tc", index_n_heads=8, index_head_dim=32, index_topk=64, hidden_act="silu",
    num_nextn_predict_layers=1, rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, attention_bias=False, initializer_range=0.02)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what dsaserve.tiny._save_tokenizer writes
REPORT = "training_report.json"  # every train-tiny output has it (the shipped folder too)
SAMPLE_PROMPTS = ("Return the", "This module provides", "Open a file and",
                  "<|bos|><|user|>What does os.path.join do?<|assistant|>",
                  "<|bos|><|user|>What does json.dumps do?<|assistant|>")


@dataclass(frozen=True)
class Preset:
    config: dict[str, Any]  # config.json
    stages: tuple[Stage, ...]
    optim: Optim
    limit_files: int | None  # None: the whole standard library
    eval_contexts: tuple[int, ...]
    eval_windows: int
    log_every: int


PRESETS = {
    "shipped": Preset(SHIPPED_CONFIG, (Stage("dense", 700, 8, 256), Stage("warmup", 60, 4, 512),
                                       Stage("sparse", 140, 4, 512)),
                      Optim(), None, (128, 256, 512), 48, 25),
    # Seconds, for the test suite: every stage, the export and the report, at toy scale.
    # YaRN's factor stays max_position_embeddings / original_max_position_embeddings, as transformers checks (it
    # warns on every load of a config where they disagree).
    "test": Preset({**SHIPPED_CONFIG, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                    "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16,
                    "max_position_embeddings": 256,
                    "rope_scaling": {**SHIPPED_CONFIG["rope_scaling"], "original_max_position_embeddings": 64}},
                   (Stage("dense", 40, 8, 64), Stage("warmup", 15, 4, 64), Stage("sparse", 15, 4, 64)),
                   Optim(warmup_steps=5), 40, (64,), 8, 10),
}


def _no_report(names: list[str]) -> str | None:
    return None if REPORT in names else f"no {REPORT}"


TRAIN_TINY = Writer("train-tiny", _no_report)  # its output folder is replaced as a whole (replace_folder.py)


def print_now(line: str) -> None:
    """print, flushed: stdout to a file or pipe (nohup, `| tee`) is block-buffered, and a run takes half an hour."""
    print(line, flush=True)


def train_tiny(out: str | Path, preset: str = "shipped", seed: int = 0, threads: int = 2,
               log: Callable[[str], None] = print_now) -> dict[str, Any]:
    """Train, then replace the folder `out` by the checkpoint and its report (untouched until then); returns the
    report. ValueError before training where `out` holds anything but train-tiny's checkpoint files
    (replace_folder.py)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    if threads < 1:  # torch.set_num_threads would raise a RuntimeError
        raise ValueError(f"--threads must be >= 1, got {threads}")
    # Resolved: a symlink's target is replaced rather than the link, and "." is seen to be the working folder.
    p, out = PRESETS[preset], checkpoint_folder(out).resolve()
    check_replaceable(out, TRAIN_TINY)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The run seeds and draws from torch's global RNG (nn modules' default init, which init_weights then
        # overwrites): an in-process caller gets its own RNG state back, as its thread count.
        with torch.random.fork_rng(devices=[]):
            return _run(p, preset, out, seed, threads, log)
    finally:
        torch.set_num_threads(caller_threads)  # an in-process caller (a test, a library call) keeps its own


def _run(p: Preset, preset: str, out: Path, seed: int, threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    start, cpu = time.monotonic(), time.process_time()
    torch.manual_seed(seed)
    # `out` is replaced only once the run is done, as a whole (replace_folder.py): a run stopped midway or while
    # writing (Ctrl-C while retraining the shipped folder) must not leave new weights beside an old tokenizer, a
    # folder that loads and serves garbage.
    with tempfile.TemporaryDirectory(prefix="train-tiny-") as scratch:
        tok, train_ids, held_ids = _tokenized_corpus(p, Path(scratch), log)
        model = TinyDSA(ModelConfig.from_dict(p.config))
        model.init_weights(seed)
        history = train(model, train_ids, p.stages, p.optim, seed, p.log_every, log)
        round_to_stored(model)  # measure exactly what ships
        log(f"evaluating on {held_ids.numel()} held-out tokens (contexts {', '.join(map(str, p.eval_contexts))})")
        measured = {**report(model, held_ids, p.eval_contexts, p.eval_windows),
                    "samples": samples(model, tok, SAMPLE_PROMPTS)}
        with replacing(out, TRAIN_TINY) as folder:
            size = write_checkpoint(model, p.config, folder)
            for name in TOKENIZER_FILES:
                shutil.copyfile(Path(scratch) / name, folder / name)
            result = {"preset": preset, "seed": seed, "threads": threads, "python": platform.python_version(),
                      "torch": torch.__version__, "train_tokens": train_ids.numel(),
                      "held_out_tokens": held_ids.numel(), "parameters": sum(t.numel() for t in model.parameters()),
                      "checkpoint_bytes": size, "history": history.rows, **measured,
                      "seconds": round(time.monotonic() - start, 1),
                      "cpu_seconds": round(time.process_time() - cpu, 1)}
            (folder / REPORT).write_text(json.dumps(result, indent=1) + "\n")
    _log_summary(result, out, log)
    return result


def _tokenized_corpus(p: Preset, out: Path, log: Callable[[str], None]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Train the tokenizer on the training documents (its TOKENIZER_FILES written to `out`); encode both splits."""
    from tokenizers import Tokenizer
    corpus = build_corpus(p.limit_files)
    plain = [_strip_specials(d) for d in corpus.train]
    _save_tokenizer(out, p.config["vocab_size"], "generic", plain, max_length=p.config["max_position_embeddings"])
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train_ids, held_ids = token_stream(corpus.train, tok), token_stream(corpus.held_out, tok)
    log(f"corpus: {corpus.files} stdlib files, {len(corpus.train)} train / {len(corpus.held_out)} held-out "
        f"documents, {train_ids.numel()} / {held_ids.numel()} tokens")
    return tok, train_ids, held_ids


def _log_summary(result: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    for row in result["perplexity"]:
        ppl = "  ".join(f"{k} {v:.2f}" for k, v in row["beyond_topk"].items())
        log(f"held-out ppl at {row['context']} tokens, positions >= index_topk: {ppl}  (sparse: by selector)")
    for i, r in enumerate(result["attention_recall"]):
        log(f"layer {i}: dense attention on the indexer's top-k {r['indexer']:.3f}, on the last k keys "
            f"{r['recent']:.3f}, best possible {r['best']:.3f}")
    top1, forced, greedy = (_rate(result[k]) for k in ("mtp_top1", "mtp_accept_teacher_forced", "mtp_accept_greedy"))
    log(f"MTP next-next-token top-1 {top1}; one-step accept rate {forced} (held-out), {greedy} (own greedy output)")
    for prompt, text in result["samples"].items():
        log(f"sample: {prompt!r} -> {text!r}")
    log(f"wrote {out} ({result['checkpoint_bytes'] / 2**20:.1f} MiB of tensors) in {result['seconds']:.0f}s "
        f"({result['cpu_seconds']:.0f} CPU seconds)")


def _rate(value: float | None) -> str:
    return "n/a (no cases)" if value is None else f"{value:.3f}"  # evaluate.rate: None where nothing was counted


def _strip_specials(text: str) -> str:
    for s in SPECIALS:
        text = text.replace(s, " " if s == SPECIALS[-1] else "")
    return text
