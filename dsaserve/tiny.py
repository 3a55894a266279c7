"""`dsaserve make-tiny-model`: a tiny random DSA checkpoint in the official format, made in seconds.

Deterministic for a given seed: config.json, sharded safetensors with an index, optional FP8 e4m3
weights with 128x128 `weight_scale_inv` blocks, the MTP layer, and a byte-level BPE tokenizer with
a chat template. Tests run on it; the default `dsaserve serve` model is the trained one in assets/.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save

from dsaserve.ops.fp8 import quantize_weight
from dsaserve.replace_folder import Writer, check_replaceable, replacing

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = """The quick brown fox jumps over the lazy dog. Sparse attention selects the most relevant
tokens for every query, so long contexts cost less. A serving engine batches requests, pages its
cache and streams tokens back to clients. DeepSeek and GLM models route each token to a few experts.
Hello world! How are you today? Tell me a story about a robot who learned to paint the sea.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def add(a, b): return a + b
The capital of France is Paris. Water boils at one hundred degrees. Once upon a time there was a
little model that could. It read every page, kept the best keys and answered in kind."""

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=48,
            kv_lora_rank=64, qk_rope_head_dim=32, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, routed_scaling_factor=2.5, norm_topk_prob=True,
            first_k_dense_replace=1, index_n_heads=32, index_head_dim=64, index_topk=16,
            hidden_act="silu", num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False, attention_bias=False, initializer_range=0.02)
ARCHS: dict[str, dict[str, Any]] = {
    "deepseek_v32": dict(
        architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", qk_nope_head_dim=32,
        v_head_dim=32, n_group=4, topk_group=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "glm_moe_dsa": dict(
        architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", qk_nope_head_dim=48,
        v_head_dim=40, n_group=1, topk_group=1, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope_theta=1000000.0, index_topk_freq=2, eos_token_id=[1, 4]),
}
# Weights kept in high precision in official FP8 checkpoints.
_NOT_FP8 = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "weights_proj", "shared_head.head")


# The files make-tiny-model writes (shards are named by their count): a folder holding only these is one it made.
_OWN_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|model\.safetensors\.index)\.json"
                        r"|model-\d{5}-of-\d{5}\.safetensors")


def _not_made_here(names: list[str]) -> str | None:
    strange = sorted(n for n in names if not _OWN_FILES.fullmatch(n))
    return f"it does not write {', '.join(strange[:5])}{', ...' if len(strange) > 5 else ''}" if strange else None


MAKE_TINY = Writer("make-tiny-model", _not_made_here)  # its output folder is replaced as a whole (replace_folder.py)


def make_tiny_model(out: str | Path, arch: str = "deepseek_v32", fp8: bool = False, layers: int | None = None,
                    seed: int = 0, fp8_block: int = 128, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> Path:
    """`overrides` replace config.json fields (e.g. real DeepSeek dims for benchmarks); `dtype` is the
    storage dtype of the high-precision tensors. The folder `out` is replaced as a whole once the checkpoint is
    written (an interrupted run leaves it as it was); ValueError where it holds other files than make-tiny-model
    writes (replace_folder.py)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    if fp8_block < 1:
        raise ValueError(f"--fp8-block must be >= 1, got {fp8_block}")
    out = checkpoint_folder(out)
    target = out.resolve()  # as train-tiny: a symlink's target is replaced rather than the link
    check_replaceable(target, MAKE_TINY)
    config = {**BASE, **ARCHS[arch], **overrides}
    if layers is not None:
        config["num_hidden_layers"] = layers
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [fp8_block, fp8_block]}
    tensors = _random_weights(config, torch.Generator().manual_seed(seed))
    tensors = {n: t.to(dtype) if n.endswith("weight") and "weights_proj" not in n else t for n, t in tensors.items()}
    if fp8:
        tensors = _quantize(tensors, fp8_block)
    with replacing(target, MAKE_TINY) as folder:
        _save_sharded(folder, tensors, shards=config["num_hidden_layers"] + 2)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
        _save_tokenizer(folder, config["vocab_size"])
    return out


def checkpoint_folder(out: str | Path) -> Path:
    """`out`, made if new: ValueError (one line from the CLI) where it cannot be a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: the checkpoint goes in a folder (a new or an existing one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission
        raise ValueError(f"cannot make the checkpoint folder {out}: {exc.strerror or exc}") from None
    return out


def _random_weights(c: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Unit-variance activations (std = fan_in^-0.5) so logits, routing and top-k have clear margins."""
    def w(*shape: int, std: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * (std if std is not None else shape[-1] ** -0.5)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    H, heads, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(c["vocab_size"], H, std=1.0),
                                  "model.norm.weight": norm(H), "lm_head.weight": w(c["vocab_size"], H)}
    own_indexer, mlp_types = _layer_types(c)
    for i in range(L + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
              p + "self_attn.q_a_proj.weight": w(c["q_lora_rank"], H),
              p + "self_attn.q_a_layernorm.weight": norm(c["q_lora_rank"]),
              p + "self_attn.q_b_proj.weight": w(heads * qk, c["q_lora_rank"]),
              p + "self_attn.kv_a_proj_with_mqa.weight": w(c["kv_lora_rank"] + c["qk_rope_head_dim"], H),
              p + "self_attn.kv_a_layernorm.weight": norm(c["kv_lora_rank"]),
              p + "self_attn.kv_b_proj.weight": w(heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                                                  c["kv_lora_rank"]),
              p + "self_attn.o_proj.weight": w(H, heads * c["v_head_dim"])}
        if i >= L or own_indexer[i] == "full":
            t |= {p + "self_attn.indexer.wq_b.weight": w(c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"]),
                  p + "self_attn.indexer.wk.weight": w(c["index_head_dim"], H),
                  p + "self_attn.indexer.k_norm.weight": norm(c["index_head_dim"]),
                  p + "self_attn.indexer.k_norm.bias": 0.1 * torch.randn(c["index_head_dim"], generator=gen),
                  p + "self_attn.indexer.weights_proj.weight": w(c["index_n_heads"], H)}
        if i < L and mlp_types[i] == "dense":
            t |= _mlp(p + "mlp.", H, c["intermediate_size"], w)
        else:
            E, inter = c["n_routed_experts"], c["moe_intermediate_size"]
            t |= {p + "mlp.gate.weight": w(E, H), p + "mlp.gate.e_score_correction_bias": 0.1 * torch.randn(E, generator=gen)}
            for e in range(E):
                t |= _mlp(f"{p}mlp.experts.{e}.", H, inter, w)
            t |= _mlp(p + "mlp.shared_experts.", H, inter * c["n_shared_experts"], w)
        if i >= L:  # MTP block
            t |= {p + "enorm.weight": norm(H), p + "hnorm.weight": norm(H), p + "eh_proj.weight": w(H, 2 * H),
                  p + "shared_head.norm.weight": norm(H), p + "shared_head.head.weight": t["lm_head.weight"].clone(),
                  p + "embed_tokens.weight": t["model.embed_tokens.weight"].clone()}
    return t


def _mlp(prefix: str, hidden: int, inter: int, w: Any) -> dict[str, torch.Tensor]:
    return {prefix + "gate_proj.weight": w(inter, hidden), prefix + "up_proj.weight": w(inter, hidden),
            prefix + "down_proj.weight": w(hidden, inter)}


def _layer_types(c: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(indexer types, MLP types) as the engine reads config.json (lists, index_topk_pattern, or the freq / offset
    and first_k_dense_replace rules): an override of any of them gives weights exactly to the layers it names."""
    from dsaserve.config import indexer_types, mlp_layer_types
    return indexer_types(c, c["num_hidden_layers"]), mlp_layer_types(c, c["num_hidden_layers"])


def _quantize(tensors: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """e4m3 weights plus per-block fp32 multipliers (`weight_scale_inv`), as the official checkpoints store."""
    out: dict[str, torch.Tensor] = {}
    for name, x in tensors.items():
        if x.dim() != 2 or any(k in name for k in _NOT_FP8):
            out[name] = x
            continue
        out[name], out[name + "_scale_inv"] = quantize_weight(x, (block, block))
    return out


def _save_sharded(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        if not part:
            continue
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        # Written as bytes: safetensors' own file writer makes 0600 files, unreadable to a server run as another user.
        (out / file).write_bytes(save({n: tensors[n].contiguous() for n in part}, metadata={"format": "pt"}))
        for n in part:
            weight_map[n] = file
            total += tensors[n].numel() * tensors[n].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


# Chat formats a tiny checkpoint's tokenizer can take (`save_tokenizer`): the generic template above, or
# the official formats' special tokens, ids 0 and 1 always BOS and EOS as config.json says.
# deepseek_v32: no chat template (DeepSeek publishes an encoding script), non-special markers as in
# the real tokenizer; glm5: GLM's Jinja template, its role tokens special, its markup tokens not.
_DS_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
_DS_MARKERS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"]
_GLM_SPECIAL = ["[gMASK]", "<|endoftext|>", "<sop>", "<|system|>", "<|observation|>", "<|user|>", "<|assistant|>"]
_GLM_MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>"]
CHAT_FORMATS = ("generic", "deepseek_v32", "glm5")


def save_tokenizer(out: str | Path, chat_format: str = "generic") -> Path:
    """(Re)write the tokenizer of the tiny checkpoint at `out` in a chat format (ids 0 / 1 stay BOS / EOS)."""
    out = Path(out)
    vocab_size = json.loads((out / "config.json").read_text())["vocab_size"]
    _save_tokenizer(out, vocab_size, chat_format)
    return out


def _save_tokenizer(out: Path, vocab_size: int, chat_format: str = "generic", texts: Iterable[str] | None = None,
                    max_length: int = 4096) -> None:
    """A byte-level BPE tokenizer trained on `texts` (default: a short sample) with a chat format's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}: choose from {', '.join(CHAT_FORMATS)}")
    special, markers = {"generic": (SPECIALS, []), "deepseek_v32": (_DS_SPECIAL, _DS_MARKERS),
                        "glm5": (_GLM_SPECIAL, _GLM_MARKERS)}[chat_format]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(markers), special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4 if texts is None else texts, trainer=trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    if chat_format == "deepseek_v32":  # as the official tokenizer: a plain encode starts with BOS
        tok.post_processor = processors.TemplateProcessing(single=f"{special[0]} $A", pair=f"{special[0]} $A $B",
                                                           special_tokens=[(special[0], tok.token_to_id(special[0]))])
    tok.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0],
                              "eos_token": special[1], "pad_token": special[1], "model_max_length": max_length,
                              "add_bos_token": False, "clean_up_tokenization_spaces": False}
    if chat_format == "generic":
        config["chat_template"] = CHAT_TEMPLATE
    elif chat_format == "glm5":
        from dsaserve.chat.glm_template import GLM_CHAT_TEMPLATE
        config["chat_template"] = GLM_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
