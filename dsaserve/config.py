"""ModelConfig: every field of a DSA checkpoint's config.json that changes the math."""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be served; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @staticmethod
    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """Factor YaRN applies to cos/sin (1.0 for DeepSeek, whose mscale == mscale_all_dim)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
        return self.yarn_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Multiplier on the attention softmax scale: mscale(factor, mscale_all_dim)^2 under YaRN."""
        if self.kind == "default" or not self.mscale_all_dim:
            return 1.0
        return self.yarn_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse" per layer
    indexer_types: tuple[str, ...]  # "full" | "shared" per layer (GLM cross-layer top-k sharing)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_rope_interleave: bool  # False: half-split (DeepSeek); True: interleaved pairs (GLM)
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    num_nextn_predict_layers: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tie_word_embeddings: bool
    fp8_block: tuple[int, int] | None  # weight_scale_inv block shape when the checkpoint is FP8
    # quantization_config's modules_to_not_convert (vLLM: ignored_layers): modules an FP8 checkpoint keeps unquantized
    fp8_unquantized: tuple[str, ...] = ()
    # GLM-5.2: MTP draft steps after the first reuse the first's top-k instead of running the MTP layer's indexer
    index_share_for_mtp_iteration: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Per-token width of the latent KV cache: normed latent | rope'd k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.rope.softmax_mscale

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def check_parallel(self, tp: int, attn_tp: int, ep: int = 1) -> None:
        """The shards each rank holds must be whole: ConfigError naming the field and the flags."""
        rules = [(self.num_attention_heads, attn_tp, "num_attention_heads", "attention-TP size (--tp / --dp)"),
                 (self.vocab_size, attn_tp, "vocab_size", "attention-TP size (--tp / --dp)"),
                 (self.intermediate_size, tp, "intermediate_size", "--tp"),
                 (self.moe_intermediate_size, tp // ep, "moe_intermediate_size", "routed experts' split (--tp / --ep)"),
                 (self.moe_intermediate_size * self.n_shared_experts, tp,
                  "moe_intermediate_size x n_shared_experts (the shared experts' width)", "--tp"),
                 (self.n_routed_experts, ep, "n_routed_experts", "--ep")]
        for value, size, name, what in rules:
            if value % size:
                raise ConfigError(f"{name}={value} is not divisible by the {what} {size}")

    @classmethod
    def from_path(cls, model_path: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """config.json of the folder, its fields replaced by `overrides` (--json-model-override-args) if given."""
        path = Path(model_path) / "config.json"
        if not path.is_file():
            hub = not Path(model_path).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_path))
            raise ConfigError(f"no config.json in {model_path}" + (
                " (a Hugging Face repo id? dsaserve reads a local folder: `huggingface-cli download "
                f"{model_path} --local-dir DIR`, then --model-path DIR)" if hub else ""))
        return cls.from_dict({**json.loads(path.read_text()), **(overrides or {})})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """ConfigError naming the field for anything it cannot serve, a field of the wrong type included."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: dsaserve serves {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            return cls._parse(raw, model_type)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a field these checks let by
            raise ConfigError(f"config.json ({model_type}) cannot be read: {type(exc).__name__}: {exc} (a field of "
                              "the wrong type or shape, in the file or in --json-model-override-args)") from None

    @classmethod
    def _parse(cls, raw: dict[str, Any], model_type: str) -> ModelConfig:
        def need(name: str) -> int:
            return _number(raw, name)

        layers = need("num_hidden_layers")
        if layers < 1:
            raise ConfigError(f"config.json ({model_type}) has num_hidden_layers={layers}: a model needs at least 1")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (DSA models use 'silu')")
        n_routed = need("n_routed_experts")
        n_group = _number(raw, "n_group", 1) or 1
        if n_routed % n_group:
            raise ConfigError(f"n_routed_experts={n_routed} is not divisible by n_group={n_group}")
        if n_group > 1 and n_routed // n_group < 2:  # a group's score is the sum of its two best experts
            raise ConfigError(f"n_routed_experts={n_routed} over n_group={n_group} leaves fewer than 2 experts "
                              f"per group (group-limited routing scores a group by its top 2)")
        if need("index_topk") < 1:  # a top-k of 0 attends to nothing; a negative one fails every batch
            raise ConfigError(f"index_topk must be >= 1, got {raw['index_topk']}")
        topk_group = _number(raw, "topk_group", 1) or 1
        if topk_group > n_group:
            raise ConfigError(f"topk_group={topk_group} exceeds n_group={n_group}")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=need("num_attention_heads"),
            q_lora_rank=need("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            n_routed_experts=n_routed,
            n_shared_experts=_number(raw, "n_shared_experts", 0),
            num_experts_per_tok=need("num_experts_per_tok"),
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=_number(raw, "routed_scaling_factor", 1.0, float),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            mlp_layer_types=mlp_layer_types(raw, layers),
            indexer_types=indexer_types(raw, layers),
            index_n_heads=need("index_n_heads"),
            index_head_dim=need("index_head_dim"),
            index_topk=need("index_topk"),
            indexer_rope_interleave=bool(raw.get("indexer_rope_interleave", model_type == "glm_moe_dsa")),
            rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6, float),
            rope=_rope_config(raw),
            max_position_embeddings=need("max_position_embeddings"),
            num_nextn_predict_layers=_number(raw, "num_nextn_predict_layers", 0),
            eos_token_ids=token_ids(raw.get("eos_token_id"), "config.json"),
            bos_token_id=raw.get("bos_token_id"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            fp8_block=_fp8_block(_object(raw, "quantization_config")),
            fp8_unquantized=_fp8_unquantized(raw.get("quantization_config")),
            index_share_for_mtp_iteration=bool(raw.get("index_share_for_mtp_iteration", False)),
            raw=raw,
        )


def token_ids(value: Any, where: str) -> tuple[int, ...]:
    """An eos_token_id field (config.json's, generation_config.json's): a token id, a list of them or null;
    ConfigError naming `where` otherwise."""
    ids = () if value is None else (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in ids):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def mlp_layer_types(raw: dict[str, Any], layers: int) -> tuple[str, ...]:
    types = raw.get("mlp_layer_types")
    if types is None:
        n_dense = min(_number(raw, "first_k_dense_replace", 3), layers)
        types = ["dense"] * n_dense + ["sparse"] * (layers - n_dense)
    if len(types) != layers or set(types) - {"dense", "sparse"}:
        raise ConfigError(f"mlp_layer_types must list 'dense'/'sparse' for {layers} layers, got {types}")
    return tuple(types)


def indexer_types(raw: dict[str, Any], layers: int) -> tuple[str, ...]:
    """Which layers run their own indexer ("full") or reuse the previous one's top-k ("shared")."""
    types = raw.get("indexer_types")
    if types is None and raw.get("index_topk_pattern") is not None:
        pattern = raw["index_topk_pattern"]
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else pattern
    if types is None:
        freq = max(_number(raw, "index_topk_freq", 1), 1)
        offset = _number(raw, "index_skip_topk_offset", 2)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]
    if len(types) != layers or set(types) - {"full", "shared"} or (layers and types[0] != "full"):
        raise ConfigError(f"indexer_types must list 'full'/'shared' for {layers} layers, starting 'full': {types}")
    return tuple(types)


_REQUIRED = object()


def _number(raw: dict[str, Any], name: str, default: Any = _REQUIRED, kind: type = int) -> Any:
    """config.json's field `name` as `kind`, or `default` where it is absent or null (ConfigError naming the field
    when it is required, or not a number)."""
    value = raw.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json ({raw.get('model_type')}) is missing required field {name!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json field {name!r} must be a number, got {value!r}")
    return kind(value)


def _object(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """config.json's field `name`, a JSON object or absent (ConfigError naming the field otherwise)."""
    value = raw.get(name)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"config.json field {name!r} must be an object, got {value!r}")
    return value


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    params = dict(_object(raw, "rope_parameters") or _object(raw, "rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json is missing 'rope_theta'")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"rope type {kind!r} is not supported (expected 'default' or 'yarn')")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("yarn rope_scaling is missing 'original_max_position_embeddings'")
    factor = params.get("factor") or raw["max_position_embeddings"] / orig
    return RopeConfig(
        theta=float(theta), kind="yarn", factor=float(factor), original_max_position=int(orig),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _fp8_block(qcfg: dict[str, Any] | None) -> tuple[int, int] | None:
    if not qcfg:
        return None
    if qcfg.get("quant_method") != "fp8":
        raise ConfigError(f"quantization {qcfg.get('quant_method')!r} is not supported (only block fp8)")
    block = qcfg.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


def _fp8_unquantized(qcfg: dict[str, Any] | None) -> tuple[str, ...]:
    names = (qcfg or {}).get("modules_to_not_convert") or (qcfg or {}).get("ignored_layers") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"quantization_config's modules_to_not_convert / ignored_layers must be a list of module "
                          f"names, got {names!r}")
    return tuple(names)


def names_module(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether `module` (a checkpoint name without `.weight`) is one of `patterns` as transformers matches
    modules_to_not_convert: a prefix ending on a module boundary ("model.layers.3" names "model.layers.3.mlp",
    not "model.layers.31"), the same as a regular expression ("model.layers.*.indexer"), or a suffix ("eh_proj")."""
    for key, regex in _compiled(patterns):
        if regex is not None and regex.match(module):
            return True
        if regex is None and (module == key or module.startswith(key + ".")):  # not a regular expression: as written
            return True
        if module.endswith(key):
            return True
    return False


@functools.lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str] | None], ...]:
    """Each pattern compiled once (None: not a regular expression). re's own cache holds 512: GLM-5.2-FP8 lists 541
    modules, and every module's check recompiled all of them (38 s to plan, and to start --load-format dummy)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    out = []
    for key in patterns:
        try:
            out.append((key, re.compile(rf"(?:{key}){boundary}")))
        except re.error:
            out.append((key, None))
    return tuple(out)
