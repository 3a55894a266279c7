"""What a checkpoint's generation_config.json says that serving uses: its end-of-sequence ids, which stop
generation beside config.json's (as vLLM and SGLang read them), and its sampling fields, the defaults of OpenAI
requests that leave those fields out (SGLang's `--sampling-defaults model`, its default; `openai` keeps the API's
own defaults). Only the fields the file sets count: transformers' GenerationConfig defaults (top_k 50) do not."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsaserve.config import ConfigError, token_ids
from dsaserve.engine.request import RequestError, SamplingParams

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
SAMPLING_DEFAULTS = ("model", "openai")  # --sampling-defaults


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    sampling: tuple[tuple[str, float], ...] = ()  # (field of SAMPLING_FIELDS, value) as the file sets them

    def default(self, field: str, fallback: float) -> float:
        return dict(self.sampling).get(field, fallback)


def read_generation_config(folder: str | Path) -> GenerationConfig:
    """The folder's generation_config.json (none: nothing); ConfigError naming the file and field it cannot use."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return GenerationConfig()
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    sampling = []
    for field in SAMPLING_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {field} must be a number, got {value!r}")
        sampling.append((field, value))
    try:  # a default no request could take would fail every request that leaves the field out
        SamplingParams(**dict(sampling)).validate()
    except RequestError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return GenerationConfig(token_ids(raw.get("eos_token_id"), str(path)), tuple(sampling))
