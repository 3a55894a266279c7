"""The cache writers' Triton kernels (GPU only; skipped cleanly on CPU or without triton): the FP8 and plain
row writers against kv_format's CPU path and index_put, and the writes with their prologues (the latent's
RMSNorm and rotary, the index key's LayerNorm, rotary and Hadamard rotation) against the kernels they replace.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.cache import kv_format  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16


@pytest.mark.parametrize("n,rope", [(512, 64), (128, 0), (64, 32)])
def test_fp8_cache_writer_equals_quantize(n, rope):
    """The fused CUDA writer stores the data bytes of kv_format.quantize_fp8 (the CPU path, checked against
    an independent decoder in test_kv_fp8.py) at exactly the given slots, and leaves the padding bytes
    of a row (zeroed once when the pool is made) alone."""
    from dsaserve.ops.triton.kv_write import write_fp8_rows
    gen = torch.Generator(DEV).manual_seed(n + rope)
    T, S = 300, 1000
    big = torch.randn(T, n + 40, device=DEV, generator=gen)
    big *= torch.exp2(torch.randint(-20, 21, (T, 1), device=DEV, generator=gen).float())
    x = big.to(BF16)[:, :n]  # a strided view, as the model's split outputs are
    x[0] = 0.0  # an all-zero row: its scale is the smallest normal, values 0
    x[1, :7] = 448.0 * 8  # amax / 448 an exact power of two
    r = torch.randn(T, rope, device=DEV, generator=gen).to(BF16) if rope else None
    slots = torch.randperm(S, device=DEV, generator=gen)[:T].to(torch.int32)
    row = kv_format.row_bytes(n, rope, kv_format.FP8)
    cache = torch.full((S, row), 0xAB, dtype=torch.uint8, device=DEV)  # rows not written keep this
    want = cache.clone()
    data = n + 4 * kv_format.num_blocks(n) + 2 * rope
    want[slots.long(), :data] = kv_format.quantize_fp8(x, r)[:, :data]
    write_fp8_rows(cache, slots, x, r)
    assert torch.equal(cache, want), f"{int((cache != want).sum())} bytes differ"


@pytest.mark.parametrize("n,rope,dtype", [(512, 64, BF16), (128, 0, BF16), (64, 32, torch.float32)])
def test_cache_row_writer_equals_index_put(n, rope, dtype):
    """A plain cache's fused writer stores cat([x, rope]) at exactly the given slots, nothing else."""
    from dsaserve.ops.triton.kv_write import write_rows
    gen = torch.Generator(DEV).manual_seed(n + rope)
    T, S = 300, 1000
    x = torch.randn(T, n + rope + 8, device=DEV, generator=gen).to(dtype)[:, :n]  # strided, as split outputs
    r = torch.randn(T, rope, device=DEV, generator=gen).to(dtype) if rope else None
    slots = torch.randperm(S, device=DEV, generator=gen)[:T].to(torch.int32)
    cache = torch.randn(S, n + rope, device=DEV, generator=gen).to(dtype)
    want = cache.clone()
    want[slots.long()] = torch.cat([x, r], -1) if rope else x
    write_rows(cache, slots, x, r)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("fp8", [True, False])
def test_latent_write_prologue_equals_the_unfused_kernels(fp8: bool) -> None:
    """The latent write with its prologue (kv_a_layernorm, k_pe's interleaved rotary) stores, bit for bit, what
    the RMSNorm and rotary kernels followed by the plain write store (bf16 rows, strided as the split outputs)."""
    from dsaserve.cache.pools import LatentPrologue
    from dsaserve.ops.fused import rms_norm, rope_
    from dsaserve.ops.triton.kv_write import prologue_applies, write_fp8_rows, write_rows
    gen = torch.Generator(DEV).manual_seed(int(fp8))
    T, S, n, r = 300, 1000, 512, 64
    kv_a = (torch.randn(T, n + r, device=DEV, generator=gen) * 3).to(BF16)
    latent, k_pe = kv_a.split([n, r], dim=-1)
    weight = (1 + 0.1 * torch.randn(n, device=DEV, generator=gen)).to(BF16)
    angle = torch.rand(T, r // 2, device=DEV, generator=gen) * 6.3
    prologue = LatentPrologue(weight, 1e-6, angle.cos().to(BF16), angle.sin().to(BF16))
    assert prologue_applies(latent, k_pe, prologue)
    slots = torch.randperm(S, device=DEV, generator=gen)[:T].to(torch.int32)
    row = kv_format.row_bytes(n, r, kv_format.FP8) if fp8 else n + r
    dtype = torch.uint8 if fp8 else BF16
    fused, unfused = torch.zeros(S, row, dtype=dtype, device=DEV), torch.zeros(S, row, dtype=dtype, device=DEV)
    write = write_fp8_rows if fp8 else write_rows
    normed = rms_norm(latent, weight, 1e-6)
    rotated = rope_(k_pe, prologue.cos, prologue.sin, True, out=torch.empty_like(k_pe))
    write(unfused, slots, normed, rotated)
    write(fused, slots, latent, k_pe, prologue)
    assert torch.equal(fused, unfused), f"{int((fused != unfused).sum())} elements differ"


@pytest.mark.parametrize("n", [128, 64])  # V3.2's index head, and the tiny models' (under one FP8 block)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_index_key_write_with_its_prologue(fp8: bool, interleaved: bool, n: int) -> None:
    """The index-key write with its prologue (LayerNorm, the indexer's rotary, over an FP8 cache the Hadamard
    rotation) stores what torch's LayerNorm followed by the rotary (+ Hadamard) kernel and the plain write
    store: bit for bit in the rows where the two LayerNorms round alike (their fp32 sums run in different
    orders: at least 90% of them), and the normed keys within a bf16 step of the row's largest value anywhere."""
    import torch.nn.functional as F

    from dsaserve.cache.pools import IndexKeyPrologue
    from dsaserve.ops.fused import rope_index_
    from dsaserve.ops.triton.kv_write import index_prologue_applies, write_fp8_rows, write_index_keys
    gen = torch.Generator(DEV).manual_seed(2 * fp8 + interleaved + n)
    T, S, r = 300, 1000, 64
    k_proj = (torch.randn(T, 2240, device=DEV, generator=gen) * 2 + 0.3).to(BF16)[:, 1536:1536 + n]  # a slice
    weight = (1 + 0.1 * torch.randn(n, device=DEV, generator=gen)).to(BF16)
    bias = (0.1 * torch.randn(n, device=DEV, generator=gen)).to(BF16)
    angle = torch.rand(T, r // 2, device=DEV, generator=gen) * 6.3
    prologue = IndexKeyPrologue(weight, bias, 1e-6, angle.cos().to(BF16), angle.sin().to(BF16), r, interleaved)
    assert index_prologue_applies(k_proj, prologue)
    slots = torch.randperm(S, device=DEV, generator=gen)[:T].to(torch.int32)
    normed = F.layer_norm(k_proj, (n,), weight, bias, 1e-6)
    want_keys = rope_index_(normed.clone(), r, prologue.cos, prologue.sin, interleaved, fp8)
    row = kv_format.row_bytes(n, 0, kv_format.FP8) if fp8 else n
    dtype = torch.uint8 if fp8 else BF16
    got, want = torch.zeros(S, row, dtype=dtype, device=DEV), torch.zeros(S, row, dtype=dtype, device=DEV)
    if fp8:
        write_fp8_rows(want, slots, want_keys)
    else:
        want[slots.long()] = want_keys
    scratch = k_proj.clone()
    write_index_keys(got, slots, scratch, prologue)
    ours = scratch.float()  # the scratch holds the normed, rotated row (before the Hadamard)
    rotated_ref = rope_index_(normed.clone(), r, prologue.cos, prologue.sin, interleaved, False).float()
    step = rotated_ref.abs().amax(dim=1, keepdim=True) * 2 ** -7  # a bf16 step at the row's largest value
    assert ((ours - rotated_ref).abs() <= step).all(), "normed keys off by more than a bf16 step"
    same_rows = (ours == rotated_ref).all(dim=1)
    assert same_rows.float().mean() > 0.9, f"only {int(same_rows.sum())} of {T} rows round alike"
    sel = slots.long()[same_rows]
    assert torch.equal(got[sel], want[sel]), "a row whose normed key rounds alike is stored differently"
