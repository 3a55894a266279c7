"""`dsaserve bench one-batch --profile`: the layer and gap arithmetic on hand-made kernel spans, and the command on
the CPU (operators by their own time)."""
from __future__ import annotations

from pathlib import Path

import pytest

import dsaserve
from dsaserve.bench.profile import Span, device_gaps, one_layer


def _layers(count: int, names: list[str], overlap: float, first: list[str] | None = None) -> list[Span]:
    """count layers of the given kernels (the first layer's: `first`, if given), 10 us each, each starting
    `overlap` us before the previous one ends (programmatic dependent launch); an embedding before and a head
    after, once per step."""
    spans, t = [Span(0.0, 5.0, "embed")], 5.0
    for i in range(count):
        for name in first if first and i == 0 else names:
            spans.append(Span(t - overlap, t - overlap + 10.0, name))
            t = t - overlap + 10.0
    spans.append(Span(t + 3.0, t + 8.0, "head"))  # 3 us idle before the head
    return spans


def test_one_layer_is_the_middle_layer_with_the_time_each_kernel_adds():
    """Kernels that run twice per layer cannot delimit it: the first once-per-layer kernel does; each kernel adds
    its own 10 us less the 2 us it overlapped the one before."""
    names = ["norm", "gemm", "norm", "attention", "gemm"]
    layer = one_layer(_layers(5, names, overlap=2.0), layers=5)
    assert [s.name for s, _ in layer] == ["attention", "gemm", "norm", "gemm", "norm"]
    assert [adds for _, adds in layer] == pytest.approx([8.0] * 5)
    assert one_layer(_layers(5, names, 2.0), layers=4) == []  # no kernel runs 4 times


def test_one_layer_of_three_is_the_second():
    """A benchmark model's first layer is dense: of three layers the one shown is layer 1 (an MoE layer)."""
    layer = one_layer(_layers(3, ["attention", "moe"], 0.0, first=["attention", "dense"]), layers=3)
    assert [s.name for s, _ in layer] == ["attention", "moe"] and [a for _, a in layer] == [10.0, 10.0]


def test_one_layer_counts_no_time_under_a_longer_kernel():
    """A kernel that ends inside an earlier, longer one (another stream) adds nothing to the step."""
    step = [Span(0, 10, "a"), Span(10, 40, "b"), Span(12, 20, "c"), Span(40, 50, "a"), Span(50, 60, "b"),
            Span(52, 58, "c"), Span(60, 70, "a")]
    assert [(s.name, adds) for s, adds in one_layer(step, layers=3)] == [("a", 10.0), ("b", 10.0), ("c", 0.0)]


def test_device_gaps_sums_idle_time_by_the_kernels_around_it():
    busy, wall, gaps = device_gaps(_layers(2, ["a", "b"], overlap=2.0))
    assert wall == pytest.approx(5 + 4 * 8 + 3 + 5)
    assert busy == pytest.approx(wall - 3)
    assert gaps == [(("b", "head"), (pytest.approx(3.0), 1))]


def test_bench_one_batch_profile_on_cpu(tiny_ds: str, capsys: pytest.CaptureFixture) -> None:
    from dsaserve.cli import main
    assert main(["bench", "one-batch", "--model-path", tiny_ds, "--batch-size", "1", "--input-len", "12",
                 "--output-len", "2", "--page-size", "4", "--profile", "2", "--profile-prefill", "3"]) == 0
    out = capsys.readouterr().out
    assert "operators of 8 decode steps at batch 2" in out and "Self CPU" in out
    # the package's folder (an A/B shows which tree ran) and the compilations after ready (none on CPU)
    assert f"dsaserve from {Path(dsaserve.__file__).parent}\n" in out
    assert "Triton compilations since the engine was ready (untimed first runs included): 0\n" in out
    prefill = out[out.index("operators of the prefill of 3 x 12 tokens"):]
    assert "Self CPU" in prefill
