"""Shared fixtures: tiny checkpoints made once per session; checked mode on for every test."""
from __future__ import annotations

import os

os.environ["DSASERVE_CHECKS"] = "1"  # invariant 8: layouts and kernel inputs are validated in tests

import pytest
import torch

from dsaserve.tiny import make_tiny_model

ARCHS = ("deepseek_v32", "glm_moe_dsa")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny_model(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_ds(tiny_models: dict[str, str]) -> str:
    return tiny_models["deepseek_v32"]


@pytest.fixture(scope="session")
def model(tiny_ds: str) -> str:
    """The name the server reports for the tiny model (its folder name)."""
    return os.path.basename(tiny_ds)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def prompts_ids(n: int, lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=gen).tolist() for length in lengths[:n]]
