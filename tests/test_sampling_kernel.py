"""Top-k / top-p / min-p as a threshold: the reference filter (CPU) against a brute-force threshold, and the
split Triton sampler (GPU) against the reference: the same tokens for the same uniforms, per row
whatever the batch (its distribution over many seeds: tests/test_config_sampler_cli.py)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from dsaserve.engine.request import Request, SamplingParams
from dsaserve.engine.thinking import ThinkingBudget
from dsaserve.engine.sampler import draw, filter_probs, logprob_rows, row_uniform, sample_tokens

gpu = pytest.mark.gpu


def _requests(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    params = [SamplingParams(temperature=rng.choice([0.3, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 0, 2, 5, 50, 900]),
                             top_p=rng.choice([1.0, 1.0, 0.5, 0.9, 0.95]), min_p=rng.choice([0.0, 0.0, 0.05]),
                             seed=i) for i in range(n)]
    return [Request(f"r{i}", [1], p, 8, 0, seed=i) for i, p in enumerate(params)]


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of varied sharpness; every 7th on a half-integer grid (many exact ties), every 11th partly masked."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=gen) * (torch.rand(rows, 1, generator=gen) * 6)
    x[::7] = (x[::7] * 2).round() / 2
    x[::11, : vocab // 3] = float("-inf")
    return x


def _brute_kept(p: list[float], params: SamplingParams) -> set[int]:
    """Tokens kept: probability >= the largest value v with at least top_k tokens or top_p of the mass at or
    above v, raised to min_p x the largest (exact sums, every distinct value tried)."""
    total, best = math.fsum(p), max(p)
    threshold = 0.0
    if params.top_k > 0 or params.top_p < 1.0:
        for v in sorted(set(p), reverse=True):
            above = [q for q in p if q >= v]
            if (params.top_k > 0 and len(above) >= params.top_k) or \
                    (params.top_p < 1.0 and math.fsum(above) >= params.top_p * total):
                threshold = v
                break
    threshold = max(threshold, params.min_p * best)
    return {i for i, q in enumerate(p) if q >= threshold and q > 0}


def test_reference_filter_keeps_the_threshold_set() -> None:
    logits, reqs = _logits(120, 300, 0), _requests(120, 0)
    filtered = filter_probs(logits, reqs)
    temp = torch.tensor([max(r.params.temperature, 1e-5) for r in reqs])[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    filtered_rows = 0
    for i, r in enumerate(reqs):
        kept = _brute_kept(probs[i].tolist(), r.params)
        assert set(filtered[i].nonzero().flatten().tolist()) == kept, (i, r.params)
        filtered_rows += len(kept) < int((probs[i] > 0).sum())
    assert filtered_rows > 60  # most rows drop tokens: the filters are exercised
    tied = torch.log(torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]]))
    kept = filter_probs(tied, [Request("t", [1], SamplingParams(top_k=2), 8, 0, seed=0)])[0]
    assert (kept[:4] > 0).all() and kept[4] == 0  # every token tied at the threshold stays


def _assert_reference_tokens(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """sample_tokens on CUDA (the Triton sampler) against filter_probs + draw on the CPU, same uniforms: the
    kernel's token is kept by the reference filter, and the reference's inverse CDF gives it for the same
    uniform up to 1e-4 of the kept mass (the reference's fp32 softmax of a 129K vocabulary sums to 1 within
    about 3e-5 on rows of many tied logits, whose roundings add up; a boundary that close to u is the only
    allowed difference). Returns the kernel's tokens."""
    got = sample_tokens(logits.cuda(), reqs).cpu()
    uniforms = [row_uniform(r.seed, 0) for r in reqs]
    probs = filter_probs(logits, reqs).double()
    cdf = probs.cumsum(-1)
    bad = []
    for i in range(len(reqs)):
        g, target = int(got[i]), uniforms[i] * cdf[i, -1].item()
        low = cdf[i, g - 1].item() if g else 0.0
        if probs[i, g] == 0 or not low - 1e-4 <= target <= cdf[i, g].item() + 1e-4:
            bad.append((i, g, reqs[i].params, probs[i, g].item(), target, low, cdf[i, g].item()))
    assert not bad, bad[:4]
    return got


@gpu
@pytest.mark.parametrize("vocab", [129280, 1000])
def test_kernel_draws_the_reference_tokens(vocab: int) -> None:
    rows = 256
    logits, reqs = _logits(rows, vocab, vocab), _requests(rows, vocab)
    got = _assert_reference_tokens(logits, reqs)
    want = draw(filter_probs(logits, reqs), [row_uniform(r.seed, 0) for r in reqs])
    assert (got == want).float().mean() > 0.98  # and nearly always the very same token


@gpu
def test_kernel_draws_the_reference_tokens_without_filters() -> None:
    """A batch of temperature-only rows skips the candidates: the chunk is picked from the chunk sums."""
    rows, vocab = 64, 129280
    logits = _logits(rows, vocab, 12)
    reqs = [Request(f"t{i}", [1], SamplingParams(temperature=[0.3, 0.7, 1.0, 1.5][i % 4], seed=i), 8, 0, seed=i)
            for i in range(rows)]
    _assert_reference_tokens(logits, reqs)


@gpu
def test_kernel_draws_the_reference_tokens_when_candidates_overflow_the_tile(monkeypatch) -> None:
    """A tile of 64 candidates (16 per chunk of this vocabulary's 3): rows with more in a chunk (the flat ones) search
    and draw through the looped path, the others in registers."""
    from dsaserve.ops.triton import sampling
    monkeypatch.setattr(sampling, "TILE", 64)
    logits, reqs = _logits(96, 20000, 4), _requests(96, 4)
    _assert_reference_tokens(logits, reqs)


@gpu
def test_kernel_edge_parameters() -> None:
    """top_k at and past the vocabulary, a tiny top_p, min_p 1, the temperature floor and a hot one, a row of
    exact ties at the top-k threshold (all stay), against the reference; a row of only -inf draws a token
    in range (the reference's is undefined there)."""
    vocab = 5000
    logits = _logits(8, vocab, 9)
    logits[6] = -5.0
    logits[6, [10, 20, 30, 40]] = torch.log(torch.tensor([0.3, 0.2, 0.2, 0.2]))
    edge = [dict(top_k=vocab), dict(top_k=vocab + 5), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-6),
            dict(temperature=100.0, top_p=0.5), dict(top_k=2), dict(top_p=0.9)]
    reqs = [Request(f"e{i}", [1], SamplingParams(**{"temperature": 1.0, **kw, "seed": 40 + i}), 8, 0, seed=40 + i)
            for i, kw in enumerate(edge)]
    _assert_reference_tokens(logits, reqs)
    masked = torch.full((1, vocab), float("-inf"))
    token = int(sample_tokens(masked.cuda(), reqs[-1:])[0])
    assert 0 <= token < vocab


def _non_finite_rows(rows: int, vocab: int) -> torch.Tensor:
    """Random rows with NaN at 5 and +inf at 7 and at a token of another chunk (the kernel's 8K chunks)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
    logits[:, 5], logits[:, [7, vocab - 3]] = float("nan"), float("inf")
    return logits


NON_FINITE_FILTERS = ({}, {"top_k": 10}, {"top_p": 0.9}, {"min_p": 0.1})


def _non_finite_requests(extra: dict) -> list[Request]:
    return [Request(f"i{i}", [1], SamplingParams(temperature=[1.0, 0.3][i % 2], seed=i, **extra), 8, 0, seed=i)
            for i in range(48)]


@pytest.mark.parametrize("extra", NON_FINITE_FILTERS)
def test_reference_draws_only_the_inf_logits_and_never_a_nan(extra: dict) -> None:
    """+inf logits take the row's whole mass, shared between them (inf - inf made the softmax NaN), and a NaN
    logit is never drawn, at any temperature and filter."""
    vocab = 9000
    assert set(sample_tokens(_non_finite_rows(48, vocab), _non_finite_requests(extra)).tolist()) == {7, vocab - 3}


@gpu
@pytest.mark.parametrize("extra", NON_FINITE_FILTERS)
def test_kernel_draws_the_reference_tokens_over_inf_and_nan_logits(extra: dict) -> None:
    logits, reqs = _non_finite_rows(48, 9000), _non_finite_requests(extra)
    assert torch.equal(sample_tokens(logits.cuda(), reqs).cpu(), sample_tokens(logits, reqs))


@gpu
def test_kernel_never_draws_a_nan_logit_and_keeps_its_chunk() -> None:
    """A NaN logit is never drawn, and the other tokens of its chunk still are (its chunk's sum was NaN, which
    dropped the whole chunk's mass)."""
    logits = torch.zeros(64, 20000)
    logits[:, [0, 9]] = float("nan")
    for extra in ({}, {"top_k": 5000}, {"top_p": 0.9}):
        reqs = [Request(f"n{i}", [1], SamplingParams(temperature=1.0, seed=i, **extra), 8, 0, seed=i)
                for i in range(64)]
        got = sample_tokens(logits.cuda(), reqs).cpu()
        assert not ((got == 0) | (got == 9)).any() and (got < 8192).any() and (got >= 8192).any(), (extra, got)


@gpu
def test_kernel_rows_do_not_depend_on_the_batch() -> None:
    logits, reqs = _logits(40, 129280, 3).cuda(), _requests(40, 3)
    batch = sample_tokens(logits, reqs)
    alone = torch.cat([sample_tokens(logits[i:i + 1], reqs[i:i + 1]) for i in range(40)])
    greedy_mixed = [Request("g", [1], SamplingParams(temperature=0.0), 8, 0, seed=0)] + reqs
    mixed = sample_tokens(torch.cat([logits[:1], logits]), greedy_mixed)[1:]
    assert torch.equal(batch, alone) and torch.equal(batch, mixed)


@gpu
def test_shaping_and_sampling_never_wait_for_the_device() -> None:
    """Penalties, logit bias, min_tokens, seeded top-p and thinking-budget rows, and the log-probabilities of the
    tokens, are enqueued without a host sync (a blocking copy waits for the forward overlapped scheduling launched;
    bincount read its largest id back), and greedy rows with penalties pick the CPU computation's tokens."""
    vocab = 5000
    logits = _logits(7, vocab, 5)
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias={"7": 5.0}),
              SamplingParams(temperature=0.0, min_tokens=4),
              SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.2, seed=4),
              SamplingParams(temperature=0.0, frequency_penalty=1.0), SamplingParams(temperature=0.7, seed=5),
              SamplingParams(temperature=0.8, seed=6, thinking_budget=ThinkingBudget(4, 17))]  # at its budget
    reqs = [Request(f"s{i}", [1, 2, 3], p, 8, 0, seed=i, output_ids=[3, 9, 9, int(logits[i].argmax())])
            for i, p in enumerate(params)]
    reqs[2].min_tokens_banned = (int(logits[2].argmax()),)
    pending = [[], [11], [], [9], [int(logits[4].argmax())], [], []]
    want = sample_tokens(logits, reqs, pending)
    on_device = logits.cuda()  # (a copy from pageable memory syncs: the forward's logits are on the device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample_tokens(on_device, reqs, pending)
        scored = logprob_rows(on_device, got, [2, 0, 5, 1, 0, 3, 0])  # (overlapped scheduling's logprobs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    assert got[greedy].tolist() == want[greedy].tolist() and int(got[6]) == int(want[6]) == 17
    on_cpu = logprob_rows(logits, got.cpu(), [2, 0, 5, 1, 0, 3, 0]).lists()
    for (chosen, top), (chosen_cpu, top_cpu) in zip(scored.lists(), on_cpu):
        assert chosen == pytest.approx(chosen_cpu, abs=1e-5) and [t for t, _ in top] == [t for t, _ in top_cpu]
