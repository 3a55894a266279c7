"""Shared fixtures: tiny checkpoints made once per session; checked mode on for every test."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator

os.environ["DSASERVE_CHECKS"] = "1"  # invariant 8: layouts and kernel inputs are validated in tests

import pytest
import torch

from dsaserve import SamplingParams
from dsaserve.tiny import make_tiny_model

ARCHS = ("deepseek_v32", "glm_moe_dsa")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny_model(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_ds(tiny_models: dict[str, str]) -> str:
    return tiny_models["deepseek_v32"]


class CompileGate(threading.Event):
    """Grammar compiles (engine/grammar_compile) wait until set(): every one, or those of the GrammarSpec objects
    given to only() (by identity: a copy of an equal spec is another object). The real compile runs after."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[Any] | None = None

    def only(self, *specs: Any) -> None:
        self.specs = list(specs)

    def holds(self, spec: Any) -> bool:
        return self.specs is None or any(spec is s for s in self.specs)


@pytest.fixture()
def compile_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileGate]:
    from dsaserve.chat.grammar import GrammarState
    from dsaserve.engine import grammar_compile
    gate = CompileGate()

    def gated(spec: Any, vocab_size: int) -> GrammarState:
        if gate.holds(spec):
            assert gate.wait(60), "the test never opened the compile gate"
        return GrammarState(spec, vocab_size)

    monkeypatch.setattr(grammar_compile, "GrammarState", gated)
    yield gate
    gate.set()


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


class WriteStopped(Exception):
    """Raised by stop_writing_at: a run interrupted while it writes its output folder (a crash, Ctrl-C)."""


def stop_writing_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Path.write_text raises WriteStopped when it is about to write a file called `name`."""
    write_text = Path.write_text

    def stopping(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if self.name == name:
            raise WriteStopped(str(self))
        return write_text(self, data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", stopping)


def prompts_ids(n: int, lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=gen).tolist() for length in lengths[:n]]


def hadamard_matrix(n: int) -> torch.Tensor:
    """The normalized Hadamard matrix from its closed form: H[i, j] = (-1)^popcount(i & j) / sqrt(n), float64."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                        dtype=torch.float64) / n ** 0.5


def sampling_features(model: str, prompts: list[list[int]]) -> list[tuple[list[int], SamplingParams]]:
    """Every prompt under each of: seeded top-p, penalties, the repetition penalty, log-probabilities, a
    JSON-schema grammar greedy and sampled, a logit bias (sampled), thinking budgets (the first token forced, sampled;
    the third, greedy, where the first prompt's second token lifts it), min_tokens before a stop token, and last a
    stop string (3 characters of the first prompt's greedy text, so that it does stop it): the request
    features whose state must follow a request across ranks, groups and servers."""
    from dsaserve import LLM
    from dsaserve.chat.grammar import checked_spec, json_grammar
    from dsaserve.engine.thinking import ThinkingBudget
    schema = {"type": "object", "properties": {"n": {"type": "boolean"}, "w": {"enum": ["ab", "cd"]}},
              "required": ["n", "w"], "additionalProperties": False}
    grammar = checked_spec(json_grammar(schema), model, (1,))
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first = LLM(model, max_total_tokens=2048).generate(prompts[:1], greedy)[0]
    stop, g0, g1 = first.text[3:6], first.token_ids[0], first.token_ids[1]
    assert len(stop) == 3
    kinds = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.7,
                            ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.4, ignore_eos=True),
             SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True),
             SamplingParams(max_tokens=24, temperature=0.0, grammar=grammar),
             SamplingParams(max_tokens=24, temperature=0.9, seed=3, grammar=grammar),
             SamplingParams(max_tokens=12, temperature=0.9, seed=4, logit_bias=((g0, -100.0), (g1, 4.0)),
                            ignore_eos=True),
             SamplingParams(max_tokens=6, temperature=0.9, seed=7, ignore_eos=True,
                            thinking_budget=ThinkingBudget(0, g1)),
             SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, thinking_budget=ThinkingBudget(2, g1)),
             SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4, stop_token_ids=(g0,)),
             SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,), ignore_eos=True)]
    return [(p, k) for k in kinds for p in prompts]


def gloo_ranks(target: Any, world: int, *args: Any) -> dict[int, Any]:
    """Run target(rank, addr, *args, out) in `world` spawned processes that join one gloo group at addr (each puts
    (rank, result) on `out`); returns their results by rank."""
    import multiprocessing as mp

    from dsaserve.parallel.nodes import free_port

    ctx = mp.get_context("spawn")
    out, addr = ctx.Queue(), f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=target, args=(r, addr, *args, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
