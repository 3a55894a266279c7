"""dsaserve: a serving engine for DeepSeek Sparse Attention models (DeepSeek-V3.2, GLM-5)."""
from dsaserve.engine.request import SamplingParams
from dsaserve.llm import LLM

__all__ = ["LLM", "SamplingParams"]
