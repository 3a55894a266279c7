"""Triton kernels vs. the PyTorch reference ops (GPU only; skipped cleanly on CPU or without triton).

Every kernel runs with outputs and intermediates poisoned (NaN / sentinel), on fresh random inputs, and is
compared with the reference evaluated in fp32 on upcast inputs.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops import triton as tops  # noqa: E402
from dsaserve.ops.triton import _common  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def poison():
    _common.POISON = True
    tops.mla.CONFIG = tops.indexer.CONFIG = tops.moe.CONFIG = None
    yield
    _common.POISON = False
    tops.mla.CONFIG = tops.indexer.CONFIG = tops.moe.CONFIG = None


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output (unwritten element or bad math)"
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- sparse MLA
def _mla_inputs(T: int, H: int, v_dim: int, rope: int, K: int, S: int, gen: torch.Generator):
    q = torch.randn(T, H, v_dim + rope, device=DEV, generator=gen).to(BF16)
    kv = torch.randn(S, v_dim + rope, device=DEV, generator=gen).to(BF16)
    idx = torch.randint(0, S, (T, K), device=DEV, generator=gen, dtype=torch.int32)
    valid = torch.randint(0, K + 1, (T,), device=DEV, generator=gen)  # ragged: valid prefix, then -1
    if T > 1:
        valid[0] = 0  # a row with no key at all
    if T > 2:
        valid[1] = 1
    idx = torch.where(torch.arange(K, device=DEV)[None, :] < valid[:, None], idx, -1)
    if T > 3:
        idx[3, ::5] = -1  # holes in the middle
    return q, kv, idx.to(torch.int32)


MLA_CASES = [
    (1, 16, 512, 64, 2048, 9000, None),
    (7, 128, 512, 64, 2048, 20000, None),
    (150, 64, 512, 64, 2048, 20000, None),  # rows x head-blocks fill the GPU: no split
    (9, 20, 512, 64, 2048, 9000, 1),
    (5, 7, 64, 32, 96, 500, None),  # tiny model dims, H not a multiple of 16
    (33, 3, 32, 16, 40, 300, 4),
    (4, 1, 64, 32, 200, 700, None),
    (70, 128, 512, 64, 2048, 20000, None),
    (3, 10, 64, 32, 300, 900, {"block_n": 16, "splits": 2}),
    (16, 16, 512, 64, 2048, 9000, {"gluon": 0}),  # Triton's narrow programs where Hopper's FP8 path takes Gluon
    (64, 32, 512, 64, 2048, 9000, {"gluon": 0}),
]


def _check_mla(q, cache, idx, scale, v_dim, splits, tol=1e-2):
    """Triton sparse_mla vs the reference (which dequantizes FP8 rows itself) on the same cache."""
    if splits is not None:
        tops.mla.CONFIG = splits if isinstance(splits, dict) else {"splits": splits}
    T, H, _ = q.shape
    out, lse = tops.sparse_mla(q, cache, idx, scale, v_dim)
    want_out, want_lse = ref.sparse_mla(q.float(), cache if cache.dtype == torch.uint8 else cache.float(), idx,
                                        scale, v_dim)
    assert out.dtype == q.dtype and out.shape == (T, H, v_dim) and lse.dtype == torch.float32
    err = rel_err(out, want_out)
    assert err < tol, f"sparse_mla rel err {err:.2e} >= {tol}"
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no key must give lse -inf"
    assert (out.float()[empty] == 0).all(), "rows with no key must give 0"
    lse_err = (lse[~empty] - want_lse[~empty]).abs().max().item() if (~empty).any() else 0.0
    assert lse_err < tol, f"lse abs err {lse_err:.2e} >= {tol}"


@pytest.mark.parametrize("T,H,v_dim,rope,K,S,splits", MLA_CASES)
def test_sparse_mla(T, H, v_dim, rope, K, S, splits):
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H)
    q, kv, idx = _mla_inputs(T, H, v_dim, rope, K, S, gen)
    _check_mla(q, kv, idx, (v_dim + rope) ** -0.5, v_dim, splits)


@pytest.mark.parametrize("splits", [None, 2])
def test_sparse_mla_runs_rows_past_the_grid_bound_in_pieces(splits, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' grids hold the query rows in CUDA's second grid dimension (at most 65,535): a 64K-row prefill
    chunk failed to launch. The kernel refuses more than mla.GRID_ROWS rows, and DSAOps runs pieces of that many
    (max_query_rows), here 3 of 7."""
    from dsaserve.ops.dispatch import DSAOps
    monkeypatch.setattr(tops.mla, "GRID_ROWS", 3)
    if splits is not None:
        tops.mla.CONFIG = {"splits": splits}
    gen = torch.Generator(DEV).manual_seed(5)
    q, kv, idx = _mla_inputs(7, 20, 512, 64, 2048, 9000, gen)
    with pytest.raises(ValueError, match="at most 3 query rows per call"):
        tops.sparse_mla(q, kv, idx, 576 ** -0.5, 512)
    out = DSAOps(attention_backend="triton").sparse_mla_rows(q, kv, idx, 576 ** -0.5, 512, None)
    want, _ = ref.sparse_mla(q.float(), kv.float(), idx, 576 ** -0.5, 512)
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_mla_fp32_full_width(fp8: bool) -> None:
    """fp32 rows are twice as wide as bf16 ones: at DeepSeek-V3.2's 128 heads x (512 + 64) the wrapper
    must shrink the key block to fit shared memory (it once launched 304 KiB tiles and failed)."""
    gen = torch.Generator(DEV).manual_seed(11)
    q, kv, idx = _mla_inputs(3, 128, 512, 64, 2048, 9000, gen)
    cache = kv_format.quantize_fp8(kv[:, :512], kv[:, 512:]) if fp8 else kv.float()
    _check_mla(q.float(), cache, idx, 576 ** -0.5, 512, None, tol=1e-4)


@pytest.mark.parametrize("T,H,v_dim,rope,K,S,splits", MLA_CASES)
def test_sparse_mla_fp8_cache(T, H, v_dim, rope, K, S, splits):
    """The 656-byte FP8 rows (e4m3 latent + fp32 scales + bf16 rope), read and dequantized in the kernel."""
    gen = torch.Generator(DEV).manual_seed(T * 1000 + H + 1)
    q, kv, idx = _mla_inputs(T, H, v_dim, rope, K, S, gen)
    magnitude = torch.exp2(torch.randint(-6, 7, (S, 1), device=DEV, generator=gen).float())  # scales vary by row
    cache = kv_format.quantize_fp8(kv[:, :v_dim].float() * magnitude, kv[:, v_dim:])
    assert cache.dtype == torch.uint8 and cache.shape[1] == kv_format.row_bytes(v_dim, rope, kv_format.FP8)
    _check_mla(q, cache, idx, (v_dim + rope) ** -0.5, v_dim, splits)
    if T * H <= 128:  # fp32 queries: IEEE dots, the kernel's dequantization must be exact
        _check_mla(q.float(), cache, idx, (v_dim + rope) ** -0.5, v_dim, splits, tol=1e-4)


@pytest.mark.parametrize("T,H,K,splits", [(64, 128, 2048, None), (5, 16, 2048, None), (9, 20, 300, 3)])
def test_sparse_mla_lengths_skip_the_padding(T: int, H: int, K: int, splits: int | None) -> None:
    """Rows whose valid slots come first, `lengths` bounding them (the engine's row_kv_len): equal to the
    reference, which reads every index; rows of 0, 1, one block and all keys, and a bound past K."""
    gen = torch.Generator(DEV).manual_seed(T + K)
    q, kv, idx = _mla_inputs(T, H, 512, 64, K, 9000, gen)
    lengths = torch.randint(0, K + 50, (T, 1), device=DEV, generator=gen, dtype=torch.int32)
    lengths[:4, 0] = torch.tensor([0, 1, 64, K])[:T]
    idx = torch.randint(0, 9000, (T, K), device=DEV, generator=gen, dtype=torch.int32)
    idx[torch.arange(K, device=DEV)[None, :] >= lengths] = -1
    if splits is not None:
        tops.mla.CONFIG = {"splits": splits}
    out, lse = tops.sparse_mla(q, kv, idx, 576 ** -0.5, 512, lengths)
    want, want_lse = ref.sparse_mla(q.float(), kv.float(), idx, 576 ** -0.5, 512)
    assert rel_err(out, want) < 1e-2
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out.float()[empty] == 0).all()
    assert (lse[~empty] - want_lse[~empty]).abs().max().item() < 1e-2


def test_sparse_mla_dispatch_strided_q():
    """Non-contiguous q (a slice) through the dispatcher, which trims any head padding."""
    from dsaserve.ops.dispatch import DSAOps
    gen = torch.Generator(DEV).manual_seed(7)
    q, kv, idx = _mla_inputs(6, 24, 512, 64, 256, 3000, gen)
    q_big = torch.randn(6, 24, 700, device=DEV, generator=gen).to(BF16)
    q_big[..., :576] = q
    out = DSAOps(attention_backend="triton").sparse_mla(q_big[..., :576], kv, idx, 0.05, 512)
    want, _ = ref.sparse_mla(q.float(), kv.float(), idx, 0.05, 512)
    err = rel_err(out, want)
    assert err < 1e-2, f"dispatch sparse_mla rel err {err:.2e}"


# ---------------------------------------------------------------- indexer
def _layout(seq_lens: list[int], q_lens: list[int], page_size: int, gen: torch.Generator):
    """Ragged requests with shuffled pages; row kv_len = position + 1 (causal within the new rows)."""
    pages = [-(-s // page_size) for s in seq_lens]
    P = max(pages) + 2
    perm = torch.randperm(len(seq_lens) * P, device=DEV, generator=gen).to(torch.int32)
    page_table = perm.reshape(len(seq_lens), P)
    row_req, row_len = [], []
    for b, (s, ql) in enumerate(zip(seq_lens, q_lens)):
        row_req += [b] * ql
        row_len += list(range(s - ql + 1, s + 1))
    row_req_t = torch.tensor(row_req, dtype=torch.int32, device=DEV)
    row_len_t = torch.tensor(row_len, dtype=torch.int32, device=DEV)[:, None]
    return page_table, row_req_t, row_len_t, len(seq_lens) * P * page_size


INDEXER_CASES = [  # seq_lens, q_lens, Hi, Di, page_size, rows_per_request (the tiling hint)
    ([5000, 40, 2100, 777], [1, 1, 1, 1], 64, 128, 64, 1),  # decode, one row shorter than topk
    ([3000, 600, 9], [2, 300, 9], 64, 128, 64, 1),  # prefill mix: > 256 rows, blocks straddle requests
    ([1500, 1200], [4, 3], 32, 128, 16, 1),  # GLM head count, verify-like rows
    ([2000, 700, 64], [203, 150, 64], 32, 128, 64, 1),  # GLM head count, prefill: 8-row blocks straddle requests
    ([300, 90, 260], [100, 30, 200], 4, 32, 16, 1),  # tiny model dims
    ([5000, 2100, 3000, 2600], [4, 4, 4, 4], 64, 128, 64, 4),  # MTP verify, S = 3: a request's rows per program
    ([3000, 2500, 2049], [3, 3, 3], 32, 128, 64, 3),  # S = 2, GLM heads: 3 rows in a 4-row tile
    ([3000, 2500, 2049], [4, 3, 4], 32, 128, 16, 4),  # a hint the rows do not follow: programs straddle requests
    ([300, 90], [2, 2], 4, 32, 16, 2),  # tiny heads: more rows per program than the hint
]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(INDEXER_CASES)))
def test_indexer_logits(case, fp8):
    seq_lens, q_lens, Hi, Di, page_size, per_request = INDEXER_CASES[case]
    gen = torch.Generator(DEV).manual_seed(case)
    page_table, row_req, row_len, S = _layout(seq_lens, q_lens, page_size, gen)
    T = row_req.numel()
    q = torch.randn(T, Hi, Di, device=DEV, generator=gen).to(BF16)
    w = torch.randn(T, Hi, device=DEV, generator=gen) * (Hi * Di) ** -0.5
    k_cache = torch.randn(S, Di, device=DEV, generator=gen).to(BF16)
    if fp8:  # e4m3 + one fp32 scale per key (132 bytes at Di = 128), scales varying by key
        k_cache = kv_format.quantize_fp8(k_cache.float() * torch.exp2(torch.randint(
            -6, 7, (S, 1), device=DEV, generator=gen).float()))
    num_keys = max(seq_lens) + 5  # columns past every kv_len too
    got = tops.indexer_logits(q, w, k_cache, page_table, row_req, row_len, page_size, num_keys, per_request)
    want = ref.indexer_logits(q.float(), w, k_cache if fp8 else k_cache.float(), page_table, row_req, row_len,
                              page_size, num_keys)
    assert got.shape == (T, num_keys) and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf exactly at pos >= kv_len"
    finite = torch.isfinite(want)
    err = rel_err(got[finite], want[finite])
    assert err < 1e-2, f"indexer_logits rel err {err:.2e} >= 1e-2"


def _selected_values(slots: torch.Tensor, logits: torch.Tensor, page_table: torch.Tensor, row_req: torch.Tensor,
                     page_size: int) -> torch.Tensor:
    """Each row's selected logits, sorted (-inf for -1): equal for two selections that differ only among ties."""
    S = (int(page_table.max()) + 1) * page_size
    pos_of = torch.zeros(page_table.shape[0], S, dtype=torch.long, device=DEV)
    cols = torch.arange(page_table.shape[1] * page_size, device=DEV)
    slots_of = page_table.long()[:, cols // page_size] * page_size + cols % page_size
    pos_of.scatter_(1, slots_of, cols.expand_as(slots_of).contiguous())
    pos = pos_of[row_req.long()[:, None], slots.clamp(min=0).long()]
    vals = logits.gather(1, pos.clamp(max=logits.shape[1] - 1)).masked_fill(slots < 0, float("-inf"))
    return vals.sort(dim=1).values


@pytest.mark.parametrize("method", ["auto", "torch"])
@pytest.mark.parametrize("case,topk,ties", [(0, 2048, False), (1, 512, False), (2, 64, False), (3, 16, False),
                                            (0, 8192, False), (0, 2048, True), (1, 512, True), (3, 16, True),
                                            (2, 100, False), (3, 37, True)])  # k not a power of two
def test_topk_slots(case, topk, ties, method):
    """auto: indexer.selection_path's kernel (split, row or sampled; torch.topk only for the reference); ties: logits
    of a few distinct values, so the kernel's choice among equal values may differ from torch's."""
    seq_lens, q_lens, Hi, Di, page_size, _ = INDEXER_CASES[case]
    gen = torch.Generator(DEV).manual_seed(100 + case)
    page_table, row_req, row_len, _ = _layout(seq_lens, q_lens, page_size, gen)
    T = row_req.numel()
    L = max(seq_lens)
    pos = torch.arange(L, device=DEV)[None, :]
    logits = torch.randn(T, L, device=DEV, generator=gen)
    if ties:
        logits = logits.mul(2).round()
    logits = logits.masked_fill(pos >= row_len, float("-inf"))
    select = tops.topk_slots if method == "auto" else tops.indexer.torch_topk_slots
    got = select(logits, row_len, page_table, row_req, page_size, topk)
    want = ref.topk_slots(logits, row_len, page_table, row_req, page_size, topk)
    assert got.shape == (T, topk) and got.dtype == torch.int32
    n_valid = row_len[:, 0].clamp(max=topk)
    first = torch.arange(topk, device=DEV)[None, :] < n_valid[:, None]
    assert ((got >= 0) == first).all(), "valid slots first, then -1"
    assert all(len(set(r[r >= 0].tolist())) == int(n) for r, n in zip(got, n_valid)), "a slot chosen twice"
    if ties:
        assert torch.equal(_selected_values(got, logits, page_table, row_req, page_size),
                           _selected_values(want, logits, page_table, row_req, page_size)), "selected values differ"
    else:
        assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values), "selected sets differ"


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("width", [tops.topk.ROW_LIMIT, tops.topk.ROW_LIMIT + 1])
def test_topk_slots_at_the_row_limit(width, ties):
    """The widest row the one-launch kernel takes (its counts at their largest), and one key more (through
    topk_slots: the split path at these 3 rows), select the same set, or with ties the same values."""
    gen = torch.Generator(DEV).manual_seed(width)
    page_table, row_req, row_len, _ = _layout([width, width - 3000, 2000], [1, 1, 1], 64, gen)
    logits = torch.randn(3, width, device=DEV, generator=gen)
    if ties:
        logits = logits.mul(2).round()
    logits = logits.masked_fill(torch.arange(width, device=DEV)[None, :] >= row_len, float("-inf"))
    select = tops.topk.row_topk_slots if width <= tops.topk.ROW_LIMIT else tops.topk_slots
    got = select(logits, row_len, page_table, row_req, 64, 2048)
    want = ref.topk_slots(logits, row_len, page_table, row_req, 64, 2048)
    if ties:
        assert torch.equal(_selected_values(got, logits, page_table, row_req, 64),
                           _selected_values(want, logits, page_table, row_req, 64))
    else:
        assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)


# ---------------------------------------------------------------- MoE
def _moe_inputs(N: int, hidden: int, inter: int, E: int, k: int, seed: int, dtype: torch.dtype = BF16):
    """x, w13, w2 in dtype, top-k ids (int64) of random scores, routing weights."""
    gen = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(N, hidden, device=DEV, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * inter, hidden, device=DEV, generator=gen) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(E, hidden, inter, device=DEV, generator=gen) * inter ** -0.5).to(dtype)
    ids = torch.rand(N, E, device=DEV, generator=gen).topk(k, dim=-1).indices
    return x, w13, w2, ids, torch.rand(N, k, device=DEV, generator=gen)


@pytest.mark.parametrize("N,num_tokens,hidden,inter,E,k", [
    (1, 1, 512, 256, 16, 4),  # decode
    (33, 30, 512, 256, 16, 8),  # padding rows
    (700, 700, 256, 128, 8, 4),  # ~350 pairs per expert: prefill tiles
    (4100, 4097, 384, 128, 8, 4),  # >= WIDE_DOWN_MIN_PAIRS pairs: 256-column down tiles over a ragged hidden
    (200, 200, 256, 192, 8, 2),  # mid tiles
    (50, 47, 96, 48, 5, 3),  # tiny dims, not multiples of the K block
    (8, 0, 128, 64, 4, 2),  # no real token
])
def test_moe_experts(N, num_tokens, hidden, inter, E, k):
    x, w13, w2, ids, tw = _moe_inputs(N, hidden, inter, E, k, N + hidden)
    ids = ids.to(torch.int32)
    got = tops.moe_experts(x, w13, w2, ids, tw, num_tokens)
    want = ref.moe_experts(x.float(), w13.float(), w2.float(), ids.long(), tw, num_tokens)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert (got[num_tokens:] == 0).all(), "padding rows must be 0"
    if num_tokens:
        err = rel_err(got[:num_tokens], want[:num_tokens])
        assert err < 1e-2, f"moe_experts rel err {err:.2e} >= 1e-2"
    else:
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_moe_direct_equals_grouped_bit_for_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows skip the routing layout (both GEMMs one M block per pair, in pair order): the same bits as
    the grouped path."""
    N, num_tokens = 5, 4  # shared experts (3 for 8 pairs), a padding row, ragged K and N (200, 96)
    x, w13, w2, ids, tw = _moe_inputs(N, 200, 96, 3, 2, 7, dtype)
    want = ref.moe_experts(x.float(), w13.float(), w2.float(), ids, tw, num_tokens)
    outs = []
    for direct in (1, 0):
        tops.moe.CONFIG = {"direct": direct, "block_m": 16}
        with monkeypatch.context() as m:
            if direct:  # the direct path builds no routing layout
                m.setattr(tops.moe, "align", None)
            outs.append(tops.moe_experts(x, w13, w2, ids, tw, num_tokens))
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][num_tokens:] == 0).all(), "padding rows must be 0"
    err = rel_err(outs[0][:num_tokens], want[:num_tokens])
    assert err < (1e-2 if dtype == BF16 else 1e-5), f"rel err {err:.2e}"


def test_moe_dispatch_forced_configs():
    """Each tile family on the same inputs (prefill tiles on a small batch and decode tiles on a large one)."""
    N = 90
    x, w13, w2, ids, tw = _moe_inputs(N, 256, 128, 6, 3, 3)
    want = ref.moe_experts(x.float(), w13.float(), w2.float(), ids, tw, N)
    for bm in (16, 64, 128):
        tops.moe.CONFIG = {"block_m": bm}
        err = rel_err(tops.moe_experts(x, w13, w2, ids, tw, N), want)
        assert err < 1e-2, f"block_m={bm}: rel err {err:.2e}"
