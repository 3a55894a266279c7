"""Expert parallelism in the MoE ops: a rank holds a slice of the routed experts and the router numbers them
from the slice's first (ops.fused.route's `local`), other ranks' pairs carrying id -1. The ops must skip those
pairs: each rank's output is then its experts' share of the whole, and the shares add up to it.

The reference op runs on CPU (every CPU test of --ep goes through it); the Triton kernels (routing layouts of
one and three launches, the layout-free decode path, the Hopper wgmma path) on a GPU, poisoned outputs.
"""
from __future__ import annotations

import pytest
import torch

from dsaserve.ops import fp8, fused, reference


def _shard_ids(ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Global expert ids -> a rank's local numbering (-1 outside [first, first + count)), written out plainly."""
    out = torch.full_like(ids, -1)
    for index, expert in enumerate(ids.flatten().tolist()):
        if first <= expert < first + count:
            out.view(-1)[index] = expert - first
    return out


def _inputs(N: int, hidden: int, inter: int, E: int, k: int, device: str, seed: int, block: bool = False):
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(N, hidden, device=device, generator=gen)
    w13 = torch.randn(E, 2 * inter, hidden, device=device, generator=gen) * hidden ** -0.5
    w2 = torch.randn(E, hidden, inter, device=device, generator=gen) * inter ** -0.5
    ids = torch.rand(N, E, device=device, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(N, k, device=device, generator=gen)
    if block:
        w13, w2 = (fp8.BlockFP8(*fp8.quantize_weight(w, (128, 128)), (128, 128)) for w in (w13, w2))
    return x, w13, w2, ids, weights


def _experts(w: torch.Tensor | fp8.BlockFP8, first: int, count: int) -> torch.Tensor | fp8.BlockFP8:
    if isinstance(w, fp8.BlockFP8):
        return fp8.BlockFP8(w.weight[first:first + count].contiguous(), w.scale[first:first + count].contiguous(),
                            w.block)
    return w[first:first + count].contiguous()


@pytest.mark.parametrize("ep", [2, 4])
def test_reference_skips_other_ranks_pairs(ep: int) -> None:
    """A rank's output equals the whole MoE with the other ranks' pairs weighted 0, and the ranks' outputs add up
    to the whole (fp32: only the order of the sums differs)."""
    N, E, k = 9, 8, 3
    x, w13, w2, ids, weights = _inputs(N, 64, 32, E, k, "cpu", seed=ep)
    whole = reference.moe_experts(x, w13, w2, ids, weights, N - 1)  # the last row is padding
    count, total = E // ep, torch.zeros_like(whole)
    for rank in range(ep):
        local = _shard_ids(ids, rank * count, count)
        out = reference.moe_experts(x, _experts(w13, rank * count, count), _experts(w2, rank * count, count), local,
                                    weights, N - 1)
        masked = reference.moe_experts(x, w13, w2, ids, torch.where(local >= 0, weights, 0.0), N - 1)
        torch.testing.assert_close(out, masked, rtol=1e-6, atol=1e-6)
        assert (out[-1] == 0).all()
        total += out
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_long_moe_calls_run_in_chunks(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past max_moe_bytes of transient rows a call runs its tokens in chunks: the same output (each token's rows are
    its own), padding rows 0, other ranks' pairs still skipped (the reference on CPU, Triton's kernels on a GPU)."""
    from dsaserve.ops.dispatch import DSAOps, _backend
    device = "cpu" if backend == "torch" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    N, E, k, hidden, inter = 23, 8, 3, 64, 32
    x, w13, w2, ids, weights = _inputs(N, hidden, inter, E, k, device, seed=7)
    local = _shard_ids(ids, 2, 4)
    whole = DSAOps(moe_backend=backend).moe(x, w13, w2, local, weights, N - 2, local_share=0.5)
    calls, module = [], _backend(backend)
    real = module.moe_experts
    monkeypatch.setattr(module, "moe_experts", lambda *a, **kw: calls.append(a[5]) or real(*a, **kw))
    per_token = k * (hidden * 4 + 2 * inter * 4)
    ops = DSAOps(moe_backend=backend, max_moe_bytes=5 * per_token)
    chunked = ops.moe(x, w13, w2, local, weights, N - 2, local_share=0.5)
    assert calls == [5, 5, 5, 5, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert (chunked[N - 2:] == 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_route_numbers_this_ranks_experts(device: str) -> None:
    """route(local=(first, count)) picks the experts route() picks, numbered from `first`, -1 for the others,
    with the same weights (the Triton kernel on a GPU, the reference on CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator(device).manual_seed(3)
    logits, bias = torch.randn(37, 256, device=device, generator=gen), torch.randn(256, device=device) * 0.1
    ids, weights = fused.route(logits, bias, 8, 4, 8, True, 2.5)
    for first in (0, 64, 224):
        local_ids, local_weights = fused.route(logits, bias, 8, 4, 8, True, 2.5, local=(first, 32))
        assert torch.equal(local_ids, _shard_ids(ids, first, 32)) and torch.equal(local_weights, weights)
        assert (local_ids >= 0).any() and (local_ids < 0).any()


GPU_CASES = [  # (tokens, hidden, inter, experts, top-k): the paths each takes, whole and per rank
    (1, 512, 256, 16, 8),  # decode: no routing layout (a block per pair); ranks without a pair
    (6, 1152, 256, 16, 8),  # 48 pairs: the one-program layout, split-K gate/up
    (32, 512, 256, 16, 8),  # 256 pairs, SMALL_PAIRS exactly: the one-program layout's limit
    (300, 512, 256, 16, 4),  # 1,200 pairs: the three-launch layout
]


@pytest.mark.gpu
@pytest.mark.parametrize("block", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_triton_moe_skips_other_ranks_pairs(case: tuple[int, int, int, int, int], block: bool) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dsaserve.ops import triton as tops
    from dsaserve.ops.triton import _common
    N, hidden, inter, E, k = case
    x, w13, w2, ids, weights = _inputs(N, hidden, inter, E, k, "cuda", seed=N, block=block)
    x = x.to(torch.bfloat16)
    if not block:
        w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
    ep = 4
    count = E // ep
    _common.POISON = True  # unwritten rows (the skipped pairs') would read NaN
    try:
        for rank in range(ep):
            local = _shard_ids(ids, rank * count, count)
            rank_w13, rank_w2 = _experts(w13, rank * count, count), _experts(w2, rank * count, count)
            got = tops.moe_experts(x, rank_w13, rank_w2, local, weights, N, local_share=1 / ep)
            want = reference.moe_experts(x.float(), _float(rank_w13), _float(rank_w2), local, weights, N)
            assert not torch.isnan(got).any(), f"rank {rank}: NaN (a skipped pair's row was read)"
            err = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
            assert err < 1e-2, f"rank {rank}: rel err {err:.2e}"
    finally:
        _common.POISON = False


@pytest.mark.gpu
def test_wgmma_moe_skips_other_ranks_pairs() -> None:
    """The Hopper prefill path (forced): sorted rows of this rank's pairs only, their sums by position."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dsaserve.ops import triton as tops
    from dsaserve.ops.triton import fp8_wgmma
    x, w13, w2, ids, weights = _inputs(512, 1024, 256, 16, 8, "cuda", seed=5, block=True)
    x = x.to(torch.bfloat16)
    if not fp8_wgmma.applies(x, w13):
        pytest.skip("the Gluon wgmma kernel is the Hopper prefill path")
    local = _shard_ids(ids, 4, 4)
    rank_w13, rank_w2 = _experts(w13, 4, 4), _experts(w2, 4, 4)
    tops.moe.CONFIG = {"wgmma": 1}
    try:
        got = tops.moe_experts(x, rank_w13, rank_w2, local, weights, 512, local_share=0.25)
        none = tops.moe_experts(x, rank_w13, rank_w2, torch.full_like(ids, -1), weights, 512, local_share=0.25)
    finally:
        tops.moe.CONFIG = None
    want = reference.moe_experts(x.float(), _float(rank_w13), _float(rank_w2), local, weights, 512)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert not torch.isnan(got).any() and err < 1e-2, f"rel err {err:.2e}"
    assert (none == 0).all(), "a rank none of whose experts was picked adds nothing"


def _float(w: torch.Tensor | fp8.BlockFP8) -> torch.Tensor | fp8.BlockFP8:
    return w if isinstance(w, fp8.BlockFP8) else w.float()
