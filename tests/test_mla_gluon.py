"""The Gluon sparse MLA (Hopper, bf16 queries over bf16 or FP8 cache rows, 512 + 64 dims) against the reference
and Triton's kernel, eager and replayed from a CUDA graph; outputs poisoned. GPU only (skipped off Hopper)."""
from __future__ import annotations

import pytest
import torch

# Skips this module without triton or CUDA; `poison` (autouse) makes every output start as NaN / sentinel.
from test_triton_kernels import DEV, _mla_inputs, poison, rel_err  # noqa: F401

from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops import triton as tops  # noqa: E402
from dsaserve.ops.triton import mla_gluon  # noqa: E402

pytestmark = pytest.mark.gpu
SCALE = 576 ** -0.5


@pytest.fixture
def launches(monkeypatch) -> list[int]:
    """Counts the Gluon kernel's launches: a test of it must not pass on Triton's kernel alone."""
    if not mla_gluon.works(torch.cuda.current_device()):
        pytest.skip("the Gluon sparse MLA is the Hopper path")
    calls: list[int] = []
    launch = mla_gluon.launch

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)
    monkeypatch.setattr(mla_gluon, "launch", counted)
    return calls


def _bound(idx: torch.Tensor) -> torch.Tensor:
    """Each row's last valid position + 1 (the engine's row_kv_len bounds rows the same way)."""
    pos = torch.arange(1, idx.shape[1] + 1, device=idx.device)
    return ((idx >= 0) * pos).amax(1).to(torch.int32)[:, None]


def _cache(kv: torch.Tensor, fp8: bool, gen: torch.Generator) -> torch.Tensor:
    """bf16 rows, or FP8 rows whose scales vary by row (powers of two from 2^-6 to 2^6)."""
    if not fp8:
        return kv
    magnitude = torch.exp2(torch.randint(-6, 7, (kv.shape[0], 1), device=DEV, generator=gen).float())
    return kv_format.quantize_fp8(kv[:, :512].float() * magnitude, kv[:, 512:])


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T,H,K,splits,bounded", [
    (1, 128, 2048, None, False), (7, 128, 2048, None, True), (64, 128, 2048, None, True),
    (150, 64, 2048, None, False), (9, 48, 300, 3, True), (64, 128, 2048, 1, False), (300, 128, 1000, None, True),
    (5, 64, 64, 1, False), (5, 64, 128, 1, False), (5, 64, 130, 1, False), (3, 64, 256, 1, False)])
def test_gluon_sparse_mla_matches_the_reference(launches, fp8: bool, T: int, H: int, K: int, splits: int | None,
                                                 bounded: bool) -> None:
    """Ragged rows, a row of no key, holes inside the valid prefix (from _mla_inputs), head counts that are
    not a multiple of 64, forced and automatic splits, 1-4 key blocks per program (each loop's prologue, and
    its slots read a block ahead): as accurate as Triton's kernel on the same inputs."""
    gen = torch.Generator(DEV).manual_seed(T * 7 + H)
    q, kv, idx = _mla_inputs(T, H, 512, 64, K, 20000, gen)
    kv = _cache(kv, fp8, gen)
    lengths = _bound(idx) if bounded else None
    assert mla_gluon.applies(q, kv, 512)
    tops.mla.CONFIG = {"splits": splits} if splits else None
    out, lse = tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)
    assert len(launches) == 1
    tops.mla.CONFIG = {"gluon": 0, **({"splits": splits} if splits else {})}
    triton_out, _ = tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)
    assert len(launches) == 1
    want, want_lse = ref.sparse_mla(q.float(), kv if fp8 else kv.float(), idx, SCALE, 512)
    err, triton_err = rel_err(out, want), rel_err(triton_out, want)
    assert err < 1e-2 and err <= 1.2 * triton_err + 1e-4, f"Gluon {err:.2e}, Triton {triton_err:.2e}"
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out.float()[empty] == 0).all()
    assert (lse[~empty] - want_lse[~empty]).abs().max().item() < 1e-3


@pytest.mark.parametrize("fp8", [False, True])
def test_gluon_sparse_mla_replays_in_a_cuda_graph(launches, fp8: bool) -> None:
    """Captured once (splits and all), replayed on new queries, slots and bounds: the eager result, bit for bit."""
    gen = torch.Generator(DEV).manual_seed(3)
    q, kv, idx = _mla_inputs(16, 128, 512, 64, 2048, 20000, gen)
    kv = _cache(kv, fp8, gen)
    lengths = _bound(idx)
    tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)
    q2, _, idx2 = _mla_inputs(16, 128, 512, 64, 2048, 20000, gen)
    q.copy_(q2)
    idx.copy_(idx2)
    lengths.copy_(_bound(idx2))
    graph.replay()
    want, want_lse = tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)
    assert len(launches) == 3
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert rel_err(out, ref.sparse_mla(q.float(), kv if fp8 else kv.float(), idx, SCALE, 512)[0]) < 1e-2


@pytest.mark.parametrize("fp8,T,H,gluon", [
    (True, 4, 16, True), (True, 300, 16, True), (True, 16, 8, True), (True, 1, 32, True), (True, 9, 20, True),
    (False, 64, 32, True), (False, 300, 24, True), (True, 1, 16, False), (True, 3, 8, False), (False, 300, 16, False),
    (False, 16, 32, False)])
def test_narrow_heads_take_the_gluon_kernel_where_the_rule_says(launches, fp8: bool, T: int, H: int,
                                                                 gluon: bool) -> None:
    """A --tp 4 / 8 rank's 8-32 heads in the Gluon kernel's 64-row tiles (mla._gluon): the heads past H are
    masked off, so every stored head matches the reference (poisoned outputs: a head left unwritten is NaN) and
    no row's store reaches the next row's heads."""
    gen = torch.Generator(DEV).manual_seed(T * 13 + H)
    q, kv, idx = _mla_inputs(T, H, 512, 64, 2048, 20000, gen)
    kv = _cache(kv, fp8, gen)
    lengths = _bound(idx)
    out, lse = tops.sparse_mla(q, kv, idx, SCALE, 512, lengths)
    assert len(launches) == int(gluon)
    want, want_lse = ref.sparse_mla(q.float(), kv if fp8 else kv.float(), idx, SCALE, 512)
    assert rel_err(out, want) < 1e-2
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out.float()[empty] == 0).all()
    assert (lse[~empty] - want_lse[~empty]).abs().max().item() < 1e-3


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("H,splits", [(16, 1), (20, 4), (8, 2)])
def test_gluon_kernel_stores_no_head_past_h(launches, fp8: bool, H: int, splits: int) -> None:
    """The kernel's outputs and LSE (partials too) as H-head views of 64-head buffers: the 64 - H heads past H,
    which the kernel multiplies as zero rows, stay NaN; the first H are written."""
    gen = torch.Generator(DEV).manual_seed(H + splits)
    q, kv, idx = _mla_inputs(6, H, 512, 64, 300, 5000, gen)
    kv = _cache(kv, fp8, gen)
    o_full = torch.full((6, 64, splits, 512), float("nan"), dtype=torch.bfloat16, device=DEV)
    l_full = torch.full((6, 64, splits), float("nan"), device=DEV)
    o_buf, l_buf = o_full[:, :H], l_full[:, :H]
    mla_gluon.launch(q, *kv_format.row_views(kv, 512, 64), fp8, idx, idx, False, o_buf, l_buf, o_buf.stride(2),
                     l_buf.stride(2), splits, 1.4426950408889634 * SCALE)
    assert len(launches) == 1
    assert torch.isnan(o_full[:, H:]).all() and torch.isnan(l_full[:, H:]).all()
    assert not torch.isnan(o_buf).any() and not torch.isnan(l_buf).any()
