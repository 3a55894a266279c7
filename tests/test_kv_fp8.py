"""FP8 KV cache (--kv-cache-dtype fp8_e4m3): the 656-byte latent rows and the index-key rows.

The expected values come from an independent decoder: a byte-by-byte e4m3 table built from the format's
definition (sign, 4 exponent bits with bias 7, 3 mantissa bits; 0x7f / 0xff are NaN) and fp32 scales and
bf16 rope values read from the raw bytes with `struct`, never from the code under test.

Error bound of a dequantized value x' of x in a block with max |x| = amax (derived): the scale s is the
power of two 2^ceil(log2(amax / 448)), so x / s is exact and lies in [-448, 448]; rounding it to the
nearest e4m3 errs by at most half an ulp: 2^-4 |x / s| for normals (3 mantissa bits) and 2^-10 below
2^-6 (subnormal spacing 2^-9). With s < 2 amax / 448:  |x' - x| <= 2^-4 |x| + 2^-9 amax / 448.
"""
from __future__ import annotations

import struct

import pytest
import torch

from conftest import ARCHS, hadamard_matrix, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.cache import kv_format
from dsaserve.cache.pools import KVPools
from dsaserve.config import ModelConfig
from dsaserve.engine.layout import LayoutError
from dsaserve.ops import fused, reference
from dsaserve.ops.dispatch import DSAOps
from dsaserve.server_args import ServerArgs
from dsaserve.tiny import ARCHS as TINY_ARCHS, BASE

FP8 = kv_format.FP8


def _e4m3(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    return sign * (man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))


E4M3 = torch.tensor([_e4m3(b) for b in range(256)], dtype=torch.float64)


def decode_row(row: torch.Tensor, n: int) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """One uint8 row -> (dequantized values [n] fp64, the block scales, the rope values [r] fp64). The rope
    is a whole number of 16-byte groups; the rest of the row up to its 16-byte multiple is zero padding."""
    raw = bytes(row.tolist())
    b = -(-n // 128)
    scales = list(struct.unpack(f"<{b}f", raw[n:n + 4 * b]))
    assert len(raw) % 16 == 0, f"a {len(raw)}-byte row is not 16-byte aligned"
    rope_bytes = (len(raw) - n - 4 * b) // 16 * 16
    assert not any(raw[n + 4 * b + rope_bytes:]), "the padding is not zero"
    rope_bits = struct.unpack(f"<{rope_bytes // 2}H", raw[n + 4 * b:n + 4 * b + rope_bytes])
    rope = torch.tensor([struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in rope_bits], dtype=torch.float64)
    values = E4M3[row[:n].long()] * torch.tensor([scales[i // 128] for i in range(n)], dtype=torch.float64)
    return values, scales, rope


def decode_cache(cache: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([torch.cat([v, r]) for v, _, r in (decode_row(row, n) for row in cache)]).float()


def _representable(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Finite e4m3 values times a power of two per block of 128 (2^-20 .. 2^20): exactly representable."""
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F])
    values = E4M3[finite[torch.randint(0, len(finite), (rows, n), generator=gen)]]
    exps = torch.randint(-20, 21, (rows, -(-n // 128)), generator=gen).double()
    return (values * torch.exp2(exps).repeat_interleave(128, dim=1)[:, :n]).float()


@pytest.mark.parametrize("n,rope,nbytes", [(512, 64, 656), (128, 0, 144), (64, 32, 144), (64, 0, 80)])
def test_layout_round_trips_representable_values_exactly(n: int, rope: int, nbytes: int) -> None:
    gen = torch.Generator().manual_seed(n + rope)
    x = _representable(6, n, gen)
    x[0, :5] = 0.0
    r = torch.randn(6, rope, generator=gen).to(torch.bfloat16) if rope else None
    rows = kv_format.quantize_fp8(x, r)
    assert rows.dtype == torch.uint8 and rows.shape == (6, nbytes) == (6, kv_format.row_bytes(n, rope, FP8))
    for i in range(6):
        values, scales, rope_values = decode_row(rows[i], n)
        assert torch.equal(values, x[i].double()), f"row {i}: values do not round-trip exactly"
        for blk, s in enumerate(scales):  # powers of two that put the block max in (224, 448]
            amax = x[i, blk * 128:(blk + 1) * 128].abs().max().item()
            assert s > 0 and s == 2.0 ** round(torch.log2(torch.tensor(s)).item())
            assert amax == 0 or 224 < amax / s <= 448
        if rope:
            assert torch.equal(rope_values, r[i].double()), "rope values must be stored exactly in bf16"
    assert torch.equal(kv_format.dequantize_fp8(rows, n, rope), decode_cache(rows, n))


def test_round_trip_error_within_derived_bound() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 512
    mags = torch.exp2(torch.randint(-30, 30, (64, 4), generator=gen).float()).repeat_interleave(128, dim=1)
    x = torch.randn(64, n, generator=gen) * mags
    x[:, ::7] *= 1e-4  # values deep below their block max: the subnormal part of the bound
    x[3, :128] = 0.0  # an all-zero block
    got = decode_cache(kv_format.quantize_fp8(x), n).double()
    amax = x.abs().unflatten(1, (4, 128)).amax(-1).repeat_interleave(128, dim=1).double()
    bound = 2.0 ** -4 * x.abs().double() + 2.0 ** -9 * amax / 448
    err = (got - x.double()).abs()
    assert torch.isfinite(got).all() and (got[3, :128] == 0).all()
    ratio = err[bound > 0] / bound[bound > 0]
    assert (err <= bound).all(), f"worst error / bound = {ratio.max():.3f}"
    assert ratio.max() > 0.5  # the bound is tight: 2 mantissa bits or truncation would break it


def _cfg(arch: str, **dims: int) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **TINY_ARCHS[arch], **dims})


def test_pool_sizing_and_page_zero() -> None:
    v32 = _cfg("deepseek_v32", kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, num_hidden_layers=61)
    assert KVPools.bytes_per_token(v32, FP8) == 61 * 656 + 61 * 144  # index rows: 132 bytes, 16-aligned
    assert KVPools.bytes_per_token(v32, torch.bfloat16) == 61 * 576 * 2 + 61 * 128 * 2
    for arch in ARCHS:
        cfg = _cfg(arch)
        layers = cfg.num_hidden_layers + 1  # + the MTP layer's caches (speculative decoding)
        pools = KVPools(cfg, num_pages=5, page_size=4, dtype=FP8, device=torch.device("cpu"), num_layers=layers)
        allocated = (pools._latent.nbytes + pools._index.nbytes) // pools.num_slots
        assert KVPools.bytes_per_token(cfg, FP8, layers) == allocated
        for layer in range(layers):
            assert pools.latent(layer).shape == (20, kv_format.row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim, FP8))
            page0 = decode_cache(pools.latent(layer)[:4], cfg.kv_lora_rank)
            assert torch.isfinite(page0).all(), "page 0 (read by masked and dummy rows) must be finite"
            if layer >= cfg.num_hidden_layers or cfg.indexer_types[layer] == "full":
                assert torch.isfinite(decode_cache(pools.index_keys(layer)[:4], cfg.index_head_dim)).all()


def test_pool_writers_land_at_their_slots() -> None:
    cfg = _cfg("glm_moe_dsa")
    pools = KVPools(cfg, num_pages=4, page_size=4, dtype=FP8, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    slots = torch.tensor([5, 9, 14], dtype=torch.int32)
    latent = _representable(3, cfg.kv_lora_rank, gen)
    k_pe = torch.randn(3, cfg.qk_rope_head_dim, generator=gen).to(torch.bfloat16).float()
    keys = _representable(3, cfg.index_head_dim, gen)
    before = pools.latent(0).clone()
    pools.write_latent(0, slots, latent, k_pe)
    pools.write_index_keys(0, slots, keys)
    assert torch.equal(decode_cache(pools.latent(0)[slots.long()], cfg.kv_lora_rank), torch.cat([latent, k_pe], -1))
    assert torch.equal(decode_cache(pools.index_keys(0)[slots.long()], cfg.index_head_dim), keys)
    others = torch.ones(pools.num_slots, dtype=torch.bool)
    others[slots.long()] = False
    assert torch.equal(pools.latent(0)[others], before[others]), "only the written slots change"


def test_rotated_fp8_index_keys_keep_the_scores() -> None:
    """Keys stored rotated (k' = k H) and queries rotated alike score as the unrotated fp32 pair does, within the
    e4m3 bound of k' (module docstring: |dk'_i| <= 2^-4 |k'_i| + 2^-9 amax' / 448), so q.k errs by at most
    sum_i |q'_i| |dk'_i| (q' = q H, H orthogonal), and each logit by sum_h |w_h| times that (relu is
    1-Lipschitz). Unrotated queries against the same cache miss: the stored keys are in the rotated basis."""
    cfg = _cfg("deepseek_v32", index_head_dim=128)
    pools = KVPools(cfg, num_pages=4, page_size=4, dtype=FP8, device=torch.device("cpu"))
    assert pools.rotates_index_keys
    with pytest.raises(ValueError, match="power-of-two index_head_dim, got 96"):
        KVPools(_cfg("deepseek_v32", index_head_dim=96), num_pages=4, page_size=4, dtype=FP8,
                device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    S, T, H, Di = 16, 3, 4, 128
    keys = torch.randn(S, Di, generator=gen)
    keys[:, 5] *= 40.0  # an outlier channel
    pools.write_index_keys(0, torch.arange(S, dtype=torch.int32), fused.hadamard_reference(keys))
    q, w = torch.randn(T, H, Di, generator=gen), torch.rand(T, H, generator=gen)
    table, req = torch.arange(4, dtype=torch.int32)[None], torch.zeros(T, dtype=torch.int32)
    kv_len = torch.full((T, 1), S)
    got = reference.indexer_logits(fused.hadamard_reference(q), w, pools.index_keys(0), table, req, kv_len, 4, S)
    want = reference.indexer_logits(q, w, keys, table, req, kv_len, 4, S)
    k_rot, q_rot = keys.double() @ hadamard_matrix(Di), q.double() @ hadamard_matrix(Di)
    dk = 2.0 ** -4 * k_rot.abs() + 2.0 ** -9 * k_rot.abs().amax(-1, keepdim=True) / 448  # [S, Di]
    bound = (w.double()[:, :, None] * (q_rot.abs() @ dk.T)).sum(1)  # [T, S]
    assert ((got - want).abs() <= bound).all()
    unrotated = reference.indexer_logits(q, w, pools.index_keys(0), table, req, kv_len, 4, S)
    assert not ((unrotated - want).abs() <= bound).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_indexer_rotates_keys_and_queries_over_an_fp8_cache(arch: str, tiny_models: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0's index keys and queries (computed alike over either cache: nothing read from it yet) are the
    plain run's times H (closed form): the FP8 cache holds the keys quantized in the rotated basis, and the
    queries that score them are rotated alike."""
    queries: list[torch.Tensor] = []
    scored = DSAOps.indexer_topk

    def spy(self: DSAOps, q: torch.Tensor, *args: object) -> torch.Tensor:
        queries.append(q.clone())
        return scored(self, q, *args)

    monkeypatch.setattr(DSAOps, "indexer_topk", spy)
    prompt = prompts_ids(1, [30], seed=5)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    plain = LLM(tiny_models[arch], device="cpu", max_total_tokens=1024, page_size=1)
    queries.clear()  # the warm-up's
    plain.generate(prompt, params)
    plain_q = queries[0]
    fp8 = LLM(tiny_models[arch], device="cpu", max_total_tokens=1024, page_size=1, kv_cache_dtype="fp8_e4m3")
    queries.clear()
    fp8.generate(prompt, params)
    assert queries[0].shape[0] == plain_q.shape[0] == 30
    n = plain.engine.runner.cfg.index_head_dim
    rotated_q = plain_q.double() @ hadamard_matrix(n)
    torch.testing.assert_close(queries[0].double(), rotated_q, rtol=0, atol=1e-5 * rotated_q.abs().max().item())
    slots = torch.arange(1, 31)  # page 0 is reserved; one request's tokens fill the next slots in order
    keys = plain.engine.runner.pools.index_keys(0)[slots]
    got = fp8.engine.runner.pools.index_keys(0)[slots]
    assert torch.equal(got, kv_format.quantize_fp8((keys.double() @ hadamard_matrix(n)).float()))
    assert (got != kv_format.quantize_fp8(keys)).any(-1).sum() > 20  # (a last-bit difference could flip one row)


def test_reference_ops_read_fp8_rows() -> None:
    """The readers dequantize the selected rows: equal to the ops over the independently decoded cache."""
    gen = torch.Generator().manual_seed(3)
    S, T, H, v_dim, rope = 40, 5, 4, 128, 32
    cache = kv_format.quantize_fp8(torch.randn(S, v_dim, generator=gen), torch.randn(S, rope, generator=gen))
    plain = decode_cache(cache, v_dim)
    q = torch.randn(T, H, v_dim + rope, generator=gen)
    idx = torch.randint(0, S, (T, 9), generator=gen, dtype=torch.int32)
    idx[1, 4:] = -1
    idx[2] = -1
    out, lse = reference.sparse_mla(q, cache, idx, 0.1, v_dim)
    want, want_lse = reference.sparse_mla(q, plain, idx, 0.1, v_dim)
    assert torch.allclose(out, want, atol=1e-5) and torch.equal(torch.isinf(lse), torch.isinf(want_lse))

    Di = 64
    k_cache = kv_format.quantize_fp8(torch.randn(S, Di, generator=gen))
    page_table = torch.tensor([[3, 1, 7, 0], [2, 5, 6, 4]], dtype=torch.int32)
    row_req = torch.tensor([0, 0, 1], dtype=torch.int32)
    row_kv_len = torch.tensor([[9], [17], [20]], dtype=torch.int32)
    qi, w = torch.randn(3, 8, Di, generator=gen), torch.rand(3, 8, generator=gen)
    got = reference.indexer_logits(qi, w, k_cache, page_table, row_req, row_kv_len, 5, 20)
    want = reference.indexer_logits(qi, w, decode_cache(k_cache, Di), page_table, row_req, row_kv_len, 5, 20)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-5)


def test_checked_mode_names_a_wrong_cache() -> None:
    q = torch.randn(2, 4, 160)
    idx = torch.zeros(2, 3, dtype=torch.int32)
    bad = torch.zeros(10, 200, dtype=torch.uint8)  # not 128 + 4 + 2 * 32 = 196 bytes, padded to 208
    with pytest.raises(LayoutError, match="latent cache is FP8 .* 200 bytes per row, expected 208"):
        DSAOps().sparse_mla(q, bad, idx, 0.1, 128)
    with pytest.raises(LayoutError, match="latent cache rows have 150 values, expected 160"):
        DSAOps().sparse_mla(q, torch.zeros(10, 150), idx, 0.1, 128)


def test_flag_names() -> None:
    assert ServerArgs(kv_cache_dtype="bfloat16").kv_cache_dtype == "bfloat16"
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, bf16, bfloat16, fp8_e4m3, got 'fp8'"):
        ServerArgs(kv_cache_dtype="fp8")


# ---------------------------------------------------------------- accuracy of the engine
N_TOKENS = 32
PROMPT_LENGTHS = [20, 40, 33, 70]  # all longer than index_topk (16): selection is active
# Measured (teacher-forced over 4 x 32 positions, against the fp32 cache): top-1 agreement and mean chosen-token
# |d log p| -- fp8_e4m3 (index keys Hadamard-rotated): deepseek_v32 80/128, 0.30 nats; glm_moe_dsa 76/128, 0.35
# nats (unrotated: 76/128, 0.31 and 87/128, 0.23). bf16: 120/128, 0.028; 126/128, 0.010. The random tiny models
# have near-tied indexer scores and top-2 logits, so e4m3 key noise flips selections (FP8 index keys alone,
# unrotated: 80/128, 0.29 and 82/128, 0.26). Bounds: at least 1.4x margin on the error.
# Decode and prefill steps round the same rows (bf16's finer grid flips more roundings): |d log p| <= tol.
BOUNDS = {"fp8_e4m3": (0.45, 0.5, 1e-3), "bf16": (0.85, 0.06, 1e-2)}  # (top-1 agreement, mean error, tol)


def _scored(llm: LLM, prompts: list[list[int]], seqs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced: (log p of each token after its prompt, the top-1 token there) for every seq, as prompt
    log-probs (prefill rows read the cache like decode rows: every key goes through it)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    for i, seq in enumerate(seqs):
        llm.engine.add_request(f"s{i}", seq, params)
    got = {o.rid: o.prompt_logprobs for o in llm.engine.run_until_idle() if o.prompt_logprobs is not None}
    scored = []
    for i, p in enumerate(prompts):
        rows = got[f"s{i}"][len(p) - 1:]  # entry j scores seq[j + 1]
        scored.append((torch.tensor([lp for lp, _ in rows]), torch.tensor([top[0][0] for _, top in rows])))
    return scored


@pytest.mark.parametrize("kv", ["fp8_e4m3", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_dtype_accuracy(arch: str, kv: str, tiny_models: dict[str, str]) -> None:
    prompts = prompts_ids(4, PROMPT_LENGTHS, seed=3)
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    exact = LLM(tiny_models[arch], max_total_tokens=4096)  # fp32 cache: the oracle-matching run
    seqs = [p + o.token_ids for p, o in zip(prompts, exact.generate(prompts, params))]
    llm = LLM(tiny_models[arch], kv_cache_dtype=kv, max_total_tokens=4096, page_size=1, chunked_prefill_size=7)
    want, got = _scored(exact, prompts, seqs), _scored(llm, prompts, seqs)
    err = torch.cat([(g - w).abs() for (g, _), (w, _) in zip(got, want)])
    agree = sum(int((top == torch.tensor(seq[len(p):])).sum()) for (_, top), p, seq in zip(got, prompts, seqs))
    print(f"{arch} {kv} cache: greedy top-1 agreement {agree}/{err.numel()}, chosen-token |d log p| mean "
          f"{err.mean():.4f} max {err.max():.4f} nats")
    assert agree / err.numel() >= BOUNDS[kv][0] and err.mean() <= BOUNDS[kv][1]
    # Decode steps (and prefill chunks of 7 over earlier chunks) read the same rows as one prefill does.
    outs = llm.generate(prompts, params)
    own = _scored(llm, prompts, [p + o.token_ids for p, o in zip(prompts, outs)])
    for out, (lp, _) in zip(outs, own):
        assert (torch.tensor([x[0] for x in out.logprobs]) - lp).abs().max() < BOUNDS[kv][2]


@pytest.mark.parametrize("arch", ARCHS)
def test_mtp_speculation_over_fp8_cache(arch: str, tiny_models: dict[str, str]) -> None:
    """The MTP layer's own caches are FP8 too; verify/draft steps read the same rows as plain decoding, and
    graph buckets pad them with dummy requests that read the reserved page 0 (all-zero FP8 rows)."""
    prompts = prompts_ids(3, [5, 40, 17], seed=4)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    kw = dict(kv_cache_dtype="fp8_e4m3", page_size=1, max_total_tokens=4096)
    expected = [o.token_ids for o in LLM(tiny_models[arch], **kw).generate(prompts, params)]
    llm = LLM(tiny_models[arch], chunked_prefill_size=7, cuda_graph_max_bs=4, speculative_algorithm="NEXTN",
              speculative_num_steps=2, **kw)
    assert llm.engine.runner.pools.latent(llm.engine.runner.cfg.num_hidden_layers).dtype == torch.uint8
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    stats = llm.engine.stats()
    assert stats.spec_verify_steps > 0 and stats.free_pages == stats.total_pages
