"""dsaserve: a serving engine for DeepSeek Sparse Attention models (DeepSeek-V3.2, GLM-5)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsaserve.engine.request import SamplingParams
    from dsaserve.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    """LLM and SamplingParams import on first use: the server's front process (HTTP, tokenizer) starts its
    ranks before anything loads torch, seconds earlier."""
    if name == "LLM":
        from dsaserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from dsaserve.engine.request import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'dsaserve' has no attribute {name!r}")
