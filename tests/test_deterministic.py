"""--enable-deterministic-inference: a request's tokens and log-probabilities are bitwise those of its solo run,
whatever runs beside it, however its prompt is chunked, on every page size, with MTP speculation, padded static
layouts, retractions (a re-prefill) or a cached prefix, and on TP / DP-attention ranks (ops/invariant.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import ARCHS, gloo_ranks, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.llm import Completion
from dsaserve.engine import sampler
from dsaserve.ops import invariant, reference
from dsaserve.ops.dispatch import DSAOps
from dsaserve.parallel.launch import Job, OfflineRequest, init_distributed, run_jobs
from dsaserve.server_args import ServerArgs, SettingError
from dsaserve.tiny import make_tiny_model
from server_process import ServerProcess

TARGET = prompts_ids(1, [150], seed=99)[0]  # well past index_topk (16): the indexer selects
OTHERS = prompts_ids(7, [40, 7, 90, 23, 3, 61, 12], seed=3)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=17, ignore_eos=True, logprobs=0)
BESIDE = [SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=True, logprobs=0) for s, (m, t) in enumerate(
    ((5, 1.0), (30, 0.0), (9, 1.0), (17, 1.0), (28, 0.0), (3, 1.0), (12, 1.0)))]
BASE = dict(page_size=4, max_total_tokens=8192, chunked_prefill_size=32)
# Engines that differ from the solo run's in everything that may change a row's neighbours or its steps.
VARIANTS = {"MTP S=3": dict(speculative_algorithm="NEXTN", speculative_num_steps=3), "page 1": dict(page_size=1),
            "page 64": dict(page_size=64), "chunks of 8": dict(chunked_prefill_size=8),
            "unmixed steps": dict(enable_mixed_chunk=False), "padded static layouts": dict(cuda_graph_max_bs=16),
            "retractions": dict(max_total_tokens=260)}  # (the target re-prefills: prefill rows for decoded ones)


def scored(c: Completion) -> list[tuple[int, float]]:
    return list(zip(c.token_ids, [lp for lp, _ in c.logprobs]))


def beside(llm: LLM, params: SamplingParams, at: int = 3) -> Completion:
    """The target request as the at-th of 8, the others of various lengths and outputs around it."""
    prompts = OTHERS[:at] + [TARGET] + OTHERS[at:]
    return llm.generate(prompts, BESIDE[:at] + [params] + BESIDE[at:])[at]


@pytest.fixture(scope="module")
def fp8_glm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(Path(tmp_path_factory.mktemp("det")) / "glm_fp8", "glm_moe_dsa", fp8=True,
                               fp8_block=16))


@pytest.mark.parametrize("model", [*ARCHS, "glm_moe_dsa FP8"])
def test_a_request_is_bitwise_its_solo_run(model: str, tiny_models: dict[str, str], fp8_glm: str) -> None:
    path = fp8_glm if model.endswith("FP8") else tiny_models[model]
    solo = LLM(path, **BASE, enable_deterministic_inference=True, disable_radix_cache=True)
    want = {p.seed: scored(solo.generate([TARGET], p)[0]) for p in (GREEDY, SEEDED)}
    for name, flags in VARIANTS.items():
        llm = LLM(path, **(BASE | flags), enable_deterministic_inference=True)
        for at, params in ((3, GREEDY), (5, SEEDED)):
            assert scored(beside(llm, params, at)) == want[params.seed], f"{model}, {name}, seed {params.seed}"
        assert (llm.engine.scheduler.num_retractions > 0) == (name == "retractions")
        hits = llm.engine.stats().prefix_hit_tokens
        assert scored(llm.generate([TARGET], GREEDY)[0]) == want[None], f"{model}, {name}, after a cached prefix"
        assert llm.engine.stats().prefix_hit_tokens > hits  # (the target's prompt, cached by the runs above)


def test_without_the_mode_the_batch_shows_in_the_last_bits(tiny_ds: str) -> None:
    """The scenario above is one where the batch does change the values when the mode is off (CPU BLAS takes
    another kernel for one row than for several): the equalities above are not vacuous."""
    llm = LLM(tiny_ds, **BASE)
    assert scored(llm.generate([TARGET], GREEDY)[0]) != scored(beside(llm, GREEDY))


def test_ranks_give_a_request_its_solo_values(tiny_models: dict[str, str]) -> None:
    """--tp 4 --dp 2 --enable-dp-attention (attention TP 2 with its row-split indexer, MoE partial sums added in
    rank order over 4 ranks, DP groups' rows gathered and padded): the target alone, beside others on both DP
    groups, with MTP and at page size 1 in chunks of 8, for both archs; seeded alone and beside others."""
    def requests(params: SamplingParams, crowd: bool) -> list[OfflineRequest]:
        mine = [OfflineRequest(TARGET, params, dp_rank=0)]
        if not crowd:
            return mine
        return mine + [OfflineRequest(p, k, dp_rank=i % 2) for i, (p, k) in enumerate(zip(OTHERS, BESIDE))]
    cases = [(arch, GREEDY, flags, crowd) for arch in ARCHS for flags, crowd in (
        ({}, False), ({}, True), (VARIANTS["MTP S=3"], True), (dict(page_size=1, chunked_prefill_size=16), True))]  # 8 per DP group
    cases += [(ARCHS[0], SEEDED, {}, False), (ARCHS[0], SEEDED, {}, True)]
    jobs = [Job({"model_path": tiny_models[arch], **BASE, **flags}, requests(params, crowd), scored=True)
            for arch, params, flags, crowd in cases]
    args = ServerArgs(tp=4, dp=2, enable_dp_attention=True, enable_deterministic_inference=True,
                      max_total_tokens=8192)
    results = [r[0] for r in run_jobs(args, jobs)]
    for first, last in ((0, 4), (4, 8), (8, 10)):  # the solo run, then the crowded ones
        assert len(results[first]) == 24, cases[first]
        for case, got in zip(cases[first + 1:last], results[first + 1:last]):
            assert got == results[first], case


def test_a_server_gives_a_seeded_request_its_solo_values(tiny_ds: str, tmp_path: Path) -> None:
    """The reported case, through `dsaserve serve` and the openai client: a seeded top-p request (MTP, page 1)
    alone, then sent at once with 7 others (whatever steps they share), has the same tokens and log-probs."""
    with ServerProcess(tiny_ds, tmp_path / "server.log", page_size=1, max_total_tokens=4096,
                       speculative_algorithm="NEXTN", enable_deterministic_inference=True) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id

        def complete(prompt: list[int], seed: int, max_tokens: int = 24) -> tuple[list[str], list[float]]:
            c = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                          top_p=0.9, seed=seed, logprobs=0, extra_body={"ignore_eos": True})
            return c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs
        alone = complete(TARGET, 17)
        with ThreadPoolExecutor(8) as pool:
            others = [pool.submit(complete, p, i, k.max_tokens) for i, (p, k) in enumerate(zip(OTHERS, BESIDE))]
            among = pool.submit(complete, TARGET, 17).result()
            assert all(len(o.result()[0]) == k.max_tokens for o, k in zip(others, BESIDE))
    assert len(alone[0]) == 24 and among == alone


def test_row_products_follow_no_other_row() -> None:
    """ops.invariant: a row's product is its own [1, K] one at every batch size and offset (the plain GEMM's is not:
    checked, so the shapes do exercise BLAS's row-count kernels); scores are the same at every key width."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(80, 256, generator=gen), torch.randn(512, 256, generator=gen)
    own = torch.cat([invariant.linear(x[i:i + 1].clone(), w) for i in range(80)])
    assert any(not torch.equal(F.linear(x[:m], w), own[:m]) for m in range(2, 80))
    for start, stop in ((0, 1), (0, 2), (0, 16), (0, 80), (3, 40), (7, 8), (13, 80)):
        assert torch.equal(invariant.linear(x[start:stop], w), own[start:stop]), (start, stop)
    keys = torch.randn(700, 64, generator=gen)
    q = torch.randn(5, 64, generator=gen)
    full = invariant.scores(q, invariant.key_blocks(keys), 700)
    for width in (1, 255, 256, 257, 600):
        assert torch.equal(invariant.scores(q[1:4], invariant.key_blocks(keys[:width]), width), full[1:4, :width])
    torch.testing.assert_close(full, q @ keys.T, rtol=1e-5, atol=1e-5)
    heads = torch.randn(9, 3, 32, generator=gen)
    w_heads = torch.randn(3, 32, 24, generator=gen)
    torch.testing.assert_close(invariant.per_head(heads, w_heads), torch.einsum("tha,hab->thb", heads, w_heads))
    assert torch.equal(invariant.per_head(heads[4:], w_heads), invariant.per_head(heads, w_heads)[4:])


def test_pointwise_values_do_not_follow_their_offset() -> None:
    """The vector loop and its scalar tail round sigmoid and silu apart: plain, a value may change with the
    number of values before it; through invariant.pointwise it does not."""
    x = torch.randn(40000, 3, generator=torch.Generator().manual_seed(1)) * 4
    for fn in (torch.sigmoid, F.silu, torch.exp, torch.cos, torch.sin, torch.log):
        arg = x.abs() if fn is torch.log else x
        whole = invariant.pointwise(fn, arg)
        assert torch.equal(invariant.pointwise(fn, arg[7:]), whole[7:]), fn
        assert torch.equal(invariant.pointwise(fn, arg[:1]), whole[:1]), fn
        torch.testing.assert_close(whole, fn(arg), rtol=1e-6, atol=1e-6)
    flat = x.flatten()[:3000]
    plain = torch.sigmoid(flat)  # one value alone takes another path than inside the vector loop: they differ
    assert any(not torch.equal(torch.sigmoid(flat[i:i + 1]), plain[i:i + 1]) for i in range(3000))


def test_the_indexer_selection_is_canonical() -> None:
    """Equal scores go to the earlier position and the selection comes in position order, as the all-keys
    selection gives it (the attention adds its keys in that order); rows of different widths agree."""
    inf = float("-inf")
    logits = torch.tensor([[1.0, 9.0, 2.0, 9.0, 0.5, 7.0, inf],   # the best at 1, 3 and 5
                           [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0],   # all tied: the first three
                           [1.0, 1.0, 5.0, 1.0, 5.0, 1.0, inf]])  # 2 and 4, then the first of the tied 1s
    kv_len = torch.tensor([[6], [7], [6]])
    table = torch.arange(8, dtype=torch.int32).view(1, 8)
    req = torch.zeros(3, dtype=torch.int32)
    got = reference.topk_slots(logits, kv_len, table, req, 1, 3, batch_invariant=True)
    assert got.tolist() == [[1, 3, 5], [0, 1, 2], [0, 2, 4]]
    assert reference.topk_slots(logits[2:, :6], kv_len[2:], table, req[2:], 1, 3, batch_invariant=True).tolist() == \
        [[0, 2, 4]]  # as wide as the row itself
    whole = reference.topk_slots(logits[:1, :6], kv_len[:1], table, req[:1], 1, 8, batch_invariant=True)
    assert whole.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]]  # fewer keys than topk: all, in order, then -1


def test_one_row_at_real_widths_is_the_row_among_others() -> None:
    """A step of one row at DeepSeek-V3.2's attention widths (64 heads, 2048 selected keys, 512 + 64 dims): BLAS
    threads a lone GEMM entry and splits its sum; on one thread (the mode's steps) the row equals itself among 4."""
    gen = torch.Generator().manual_seed(2)
    q, cache = torch.randn(4, 64, 576, generator=gen), torch.randn(3000, 576, generator=gen)
    idx = torch.randint(0, 3000, (4, 2048), generator=gen, dtype=torch.int32)
    with invariant.one_thread():
        together = reference.sparse_mla(q, cache, idx, 0.04, 512, batch_invariant=True)[0]
        alone = reference.sparse_mla(q[:1], cache, idx[:1], 0.04, 512, batch_invariant=True)[0]
    assert torch.equal(alone, together[:1])


def test_the_mode_is_refused_where_it_cannot_hold(tiny_ds: str) -> None:
    with pytest.raises(ValueError, match="torch backends"):
        DSAOps(attention_backend="triton", moe_backend="torch", batch_invariant=True)
    with pytest.raises(SettingError, match="float32"):  # CPU matmuls in bf16 switch libraries by the batch's size
        LLM(tiny_ds, dtype="bfloat16", enable_deterministic_inference=True)
    with pytest.raises(ValueError, match="logprobs"):
        Job({}, [OfflineRequest(TARGET, SamplingParams())], scored=True)


def test_a_filtered_row_alone_is_the_row_among_others() -> None:
    """The sampler's top-p renormalization (every mode): at a real vocabulary (129,280) a row filtered alone has
    the probabilities it has beside others (a sum over one 32K+ row splits over threads; with several rows it
    does not)."""
    logits = torch.randn(6, 129280, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits, dim=-1)
    reqs = [SimpleNamespace(params=SamplingParams(top_p=0.9)) for _ in range(6)]
    together = sampler._top_filtered(probs, reqs)
    assert all(torch.equal(sampler._top_filtered(probs[i:i + 1], reqs[:1]), together[i:i + 1]) for i in range(6))


def _ordered_sums(rank: int, addr: str, out: Any) -> None:
    """One of 3 gloo ranks: all_reduce_world(ordered=True) of buffers of several sizes."""
    par = init_distributed(ServerArgs(tp=3, device="cpu"), rank, addr)
    try:
        out.put((rank, [par.all_reduce_world(_part(rank, n), ordered=True) for n in ORDERED_SIZES]))
    finally:
        dist.destroy_process_group()


ORDERED_SIZES = (1, 5, 64, 1000, 4099)


def _part(rank: int, n: int) -> torch.Tensor:
    """Rank r's part: values whose sum depends on the order of the adds ((1e8 - 1e8) + 1 = 1, 1e8 + (-1e8 + 1) = 0
    in fp32)."""
    base = torch.tensor([1e8, -1e8, 1.0])
    i = torch.arange(n)
    return base[(i + rank) % 3] * (1 + i % 7 / 8)


def test_the_ordered_sum_adds_the_ranks_in_rank_order() -> None:
    """Parallel.all_reduce_world(ordered=True) on 3 gloo ranks is (p0 + p1) + p2 at every buffer size, for values
    where another order gives another result."""
    got = gloo_ranks(_ordered_sums, 3)
    for i, n in enumerate(ORDERED_SIZES):
        want = (_part(0, n) + _part(1, n)) + _part(2, n)
        assert not torch.equal(want, _part(0, n) + (_part(1, n) + _part(2, n)))  # the order matters here
        assert all(torch.equal(got[r][i], want) for r in range(3)), n
