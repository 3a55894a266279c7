"""`--attention-backend flashmla` (FlashMLA's sparse MLA kernels) against the Triton kernel and the reference:
bf16 and FP8 caches, 16 (padded to 64), 64 and 128 heads, rows shorter than top-k, CUDA-graph replays.
GPU only, and only where `flash_mla` is built (benchmarks/build_flashmla.sh)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from test_triton_kernels import rel_err  # noqa: E402

from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import flashmla, reference  # noqa: E402
from dsaserve.ops.dispatch import DSAOps  # noqa: E402

if flashmla.available() is not None:
    pytest.skip(str(flashmla.available()), allow_module_level=True)

DEV = "cuda"
SLOTS, TOPK, SCALE = 8192, 512, 576 ** -0.5


def _inputs(T: int, H: int, fp8: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    q = torch.randn(T, H, 576, device=DEV, generator=gen).to(torch.bfloat16)
    rows = torch.randn(SLOTS, 576, device=DEV, generator=gen).to(torch.bfloat16)
    cache = kv_format.quantize_fp8(rows[:, :512], rows[:, 512:]) if fp8 else rows
    # distinct slots per row; the first `lengths` are real, the rest -1 (as the engine lays them out)
    idx = torch.rand(T, SLOTS, device=DEV, generator=gen).argsort(dim=1)[:, :TOPK].to(torch.int32)
    lengths = torch.randint(1, TOPK + 200, (T, 1), device=DEV, generator=gen, dtype=torch.int32)
    idx = torch.where(torch.arange(TOPK, device=DEV)[None, :] < lengths, idx, -1)
    return q, cache, idx, lengths


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("H", [16, 64, 128])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_flashmla_equals_triton_and_reference(T: int, H: int, fp8: bool) -> None:
    gen = torch.Generator(DEV).manual_seed(T * 3 + H + fp8)
    q, cache, idx, lengths = _inputs(T, H, fp8, gen)
    lengths_only = lengths.clamp(max=TOPK)
    got = DSAOps("flashmla").sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    triton_out = DSAOps("triton").sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    plain = kv_format.dequantize_fp8(cache, 512, 64).to(torch.bfloat16) if fp8 else cache
    want, _ = reference.sparse_mla(q.float(), plain.float(), idx, SCALE, 512, lengths_only)
    assert got.shape == (T, H, 512) and not got.isnan().any()
    assert rel_err(got, want) < 1e-2, f"FlashMLA vs reference: {rel_err(got, want):.2e}"
    assert rel_err(got, triton_out) < 1e-2, f"FlashMLA vs Triton: {rel_err(got, triton_out):.2e}"


@pytest.mark.parametrize("fp8", [False, True])
def test_flashmla_replays_in_a_cuda_graph(fp8: bool) -> None:
    """Scheduler metadata is made inside each call: a replay with other rows and lengths equals eager."""
    gen = torch.Generator(DEV).manual_seed(5)
    q, cache, idx, lengths = _inputs(16, 128, fp8, gen)
    ops = DSAOps("flashmla")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    for step in range(3):
        q2, _, idx2, lengths2 = _inputs(16, 128, fp8, torch.Generator(DEV).manual_seed(100 + step))
        q.copy_(q2)
        idx.copy_(idx2)
        lengths.copy_(lengths2)
        graph.replay()
        assert torch.equal(static_out, ops.sparse_mla_rows(q, cache, idx, SCALE, 512, lengths))


def test_flashmla_fp8_takes_more_rows_than_its_scheduler_holds() -> None:
    """A prefill chunk of more rows than the FP8 decode kernel's scheduler takes in one call (11,622 on
    Hopper; it failed with "invalid argument") runs in pieces and equals the Triton kernel row for row."""
    T = 12_000
    q, cache, idx, lengths = _inputs(T, 64, True, torch.Generator(DEV).manual_seed(9))
    got = DSAOps("flashmla").sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    want = DSAOps("triton").sparse_mla_rows(q, cache, idx, SCALE, 512, lengths)
    assert T > flashmla.FP8_MAX_ROWS and got.shape == (T, 64, 512)
    for part in (slice(0, flashmla.FP8_MAX_ROWS), slice(flashmla.FP8_MAX_ROWS, T)):
        assert rel_err(got[part], want[part]) < 1e-2, f"rows {part}: {rel_err(got[part], want[part]):.2e}"


def test_flashmla_refuses_shapes_it_cannot_run() -> None:
    """Refused by name, never run: the bf16 cache's sparse prefill kernel asserts top-k % 128 and took the process
    down (a segfault) at top-k 64, which the FP8 decode kernel takes."""
    for fp8 in (False, True):
        assert flashmla.unsupported(576, 512, 128, 2048, fp8) is None
        assert "576" in flashmla.unsupported(192, 128, 16, 64, fp8)
    assert "multiple of 64 over an FP8 cache" in flashmla.unsupported(576, 512, 128, 100, True)
    assert flashmla.unsupported(576, 512, 16, 64, True) is None
    assert "multiple of 128 over a bf16 cache" in flashmla.unsupported(576, 512, 16, 64, False)
    q, cache, idx, lengths = _inputs(3, 64, False, torch.Generator(DEV).manual_seed(0))
    with pytest.raises(ValueError, match="over a bf16 cache top-k must be a multiple of 128, got 64"):
        flashmla.sparse_mla(q, cache, idx[:, :64].contiguous(), SCALE, 512, lengths)


# The engine with FlashMLA inside: tiny models with FlashMLA's attention shapes (512 latent + 64 rope dims; 8 heads,
# padded to 64) and the smallest index_topk each cache's kernel takes (FP8: 64; bf16: 128), prompts shorter and longer.
FLASHMLA_DIMS = dict(kv_lora_rank=512, qk_rope_head_dim=64)
ENGINE_PROMPT_LENGTHS = [5, 40, 90, 150, 23, 70, 200]


@pytest.fixture(scope="module")
def flashmla_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """kv cache dtype ("auto": bf16) -> a model with the smallest index_topk FlashMLA takes over it."""
    from dsaserve.tiny import make_tiny_model
    return {kv: str(make_tiny_model(tmp_path_factory.mktemp("fmla") / "m", "deepseek_v32", layers=2,
                                    index_topk=flashmla.topk_multiple(kv == "fp8_e4m3"), **FLASHMLA_DIMS))
            for kv in ("auto", "fp8_e4m3")}


@pytest.fixture(scope="module")
def flashmla_model(flashmla_models: dict[str, str]) -> str:
    return flashmla_models["fp8_e4m3"]


def _engine_prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n,), generator=gen).tolist() for n in ENGINE_PROMPT_LENGTHS]


@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
def test_flashmla_engine_as_accurate_as_triton(kv: str, flashmla_models: dict[str, str]) -> None:
    """Eager steps through FlashMLA's kernels: as close to the fp32 torch run as the Triton engine's, tokens equal
    but at near-ties (test_triton_engine.check_run); over an FP8 cache `auto` picks it."""
    from test_triton_engine import _greedy, check_run
    from dsaserve.engine import model_runner
    flashmla_model = flashmla_models[kv]
    prompts = _engine_prompts(1) + _engine_prompts(2)
    truth = _greedy(flashmla_model, "torch", "float32", prompts, kv)
    triton_run = _greedy(flashmla_model, "triton", "bfloat16", prompts, kv)
    fmla_run = _greedy(flashmla_model, "flashmla", "bfloat16", prompts, kv, moe_backend="triton")
    check_run(f"flashmla kv {kv} vs triton", truth, triton_run, fmla_run)
    from dsaserve.config import ModelConfig
    cfg = ModelConfig.from_path(flashmla_model)
    fp8_rows = model_runner.resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16)
    assert model_runner.resolve_attention_backend("auto", torch.device(DEV), cfg, torch.bfloat16, fp8_rows) \
        == "flashmla"


@pytest.mark.parametrize("page_size", [1, 64])
def test_flashmla_engine_in_graphs_and_mtp_as_eager(page_size: int, flashmla_model: str) -> None:
    """CUDA graphs padded with dummy rows, MTP verify / draft steps (4 rows per request) and both page sizes over
    the FP8 cache with FlashMLA: tokens equal to its eager non-speculative run but at near-ties, no less accurate.
    Rows its metadata did not describe, or stale metadata, would move whole steps."""
    from test_triton_engine import _greedy, check_run
    prompts = _engine_prompts(3)
    common = dict(kv_cache_dtype="fp8_e4m3", moe_backend="triton", page_size=page_size, max_total_tokens=4096)
    truth = _greedy(flashmla_model, "torch", "float32", prompts, "fp8_e4m3", page_size=page_size,
                    max_total_tokens=4096)
    eager = _greedy(flashmla_model, "flashmla", "bfloat16", prompts, cuda_graph_max_bs=0, **common)
    graphs = _greedy(flashmla_model, "flashmla", "bfloat16", prompts, cuda_graph_max_bs=8, **common)
    mtp = _greedy(flashmla_model, "flashmla", "bfloat16", prompts, cuda_graph_max_bs=8,
                  speculative_algorithm="NEXTN", speculative_num_steps=3, **common)
    check_run(f"page {page_size}: graphs vs eager", truth, eager, graphs)
    check_run(f"page {page_size}: MTP in graphs vs eager", truth, eager, mtp)


def test_flashmla_engine_compiles_nothing_after_the_warm_up(flashmla_model: str) -> None:
    """`auto` over an FP8 cache (FlashMLA) with MTP, graphs up to 4 requests and staggered arrivals (mixed steps,
    eager verify steps past 4 requests, rows past index_topk): the counters stay where they were when ready."""
    from conftest import prompts_ids
    from test_cuda_graph import _served_without_compiling
    from dsaserve import LLM, SamplingParams
    llm = LLM(flashmla_model, page_size=64, max_total_tokens=60_000, chunked_prefill_size=512, cuda_graph_bs=(1, 2, 4),
              kv_cache_dtype="fp8_e4m3", speculative_algorithm="NEXTN", speculative_num_steps=3)
    engine = llm.engine
    assert engine.runner.ops.attention_backend == "flashmla"
    ready = engine.stats()
    for i, ids in enumerate(prompts_ids(24, [5 + 29 * (i % 9) for i in range(24)], seed=46)):
        engine.add_request(f"load-{i}", ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
        engine.step()
    _served_without_compiling(engine, ready)
