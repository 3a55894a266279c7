"""CUDA graphs over static layouts: bucketed batches padded with dummy requests give the same greedy
tokens, in decode and in speculative verify / draft steps.

On CPU the graph runner fills the same static buffers and runs them eagerly (same dummy requests,
same in-place copies of every layout field), so the padding is proven here; the GPU tests capture
and replay real graphs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ARCHS, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.cuda_graph import batch_buckets
from dsaserve.engine.engine import Engine
from dsaserve.engine.layout import StepMode, StepPlan
from dsaserve.engine.model_runner import StepShape
from dsaserve.engine.stats import EngineStats
from dsaserve.tiny import make_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = prompts_ids(5, [3, 40, 9, 17, 26], seed=41)  # rows cross index_topk (16) while decoding
SHORT = prompts_ids(3, [2, 5, 4], seed=42)  # every row starts below index_topk


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(64, (64,)) == [64] and batch_buckets(6, (2, 3, 32)) == [2, 3, 6]


def test_cuda_graph_bs_flag_sets_the_buckets(tiny_ds: str) -> None:
    """--cuda-graph-bs (SGLang's flag): only the listed sizes are made, every smaller batch pads to them;
    tokens unchanged. Parsed from the command line as a list."""
    import argparse
    from dsaserve.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert ServerArgs.from_cli(parser.parse_args(["--cuda-graph-bs", "4", "8"])).cuda_graph_bs == (4, 8)
    with pytest.raises(ValueError, match="--cuda-graph-bs must list batch sizes >= 1"):
        LLM(tiny_ds, cuda_graph_bs=(0, 4))
    expected = [o.token_ids for o in LLM(tiny_ds, page_size=4, max_total_tokens=4096).generate(SHORT, GREEDY)]
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=4096, cuda_graph_bs=(4,))
    assert llm.engine.runner.graphs.buckets == [4]
    assert [o.token_ids for o in llm.generate(SHORT, GREEDY)] == expected
    assert {b for _, b, _, _ in llm.engine.runner.graphs.shapes()} == {4}  # 3 requests, then fewer: all in 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size", [1, 64])
def test_padded_buckets_match_plain_decode(arch: str, page_size: int, tiny_models: dict[str, str]) -> None:
    common = dict(page_size=page_size, max_total_tokens=4096)
    plain = LLM(tiny_models[arch], **common)
    graphs = LLM(tiny_models[arch], cuda_graph_max_bs=8, **common)
    for prompts in (PROMPTS, SHORT):
        expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
        assert [o.token_ids for o in graphs.generate(prompts, GREEDY)] == expected
    used = {(b, keys) for _, b, _, keys in graphs.engine.runner.graphs.shapes()}
    # 5 and 3 requests ran padded to buckets 8 and 4; short rows used the select-all key bucket (16)
    assert {(8, 64), (4, 16)} <= used and any(b == 4 and keys > 16 for b, keys in used), used


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_verify_and_draft_buckets_match_plain(arch: str, tiny_models: dict[str, str]) -> None:
    """Speculative steps replay three static shapes: verify (S + 1 rows per request), the MTP pass over
    them, and one-row draft steps; each padded with dummy requests, tokens unchanged."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=3, page_size=1, max_total_tokens=4096)
    expected = [o.token_ids for o in LLM(tiny_models[arch], page_size=1, max_total_tokens=4096).generate(
        PROMPTS, GREEDY)]
    llm = LLM(tiny_models[arch], cuda_graph_max_bs=8, **spec)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    shapes = llm.engine.runner.graphs.shapes()
    assert {("target", 8, 4), ("draft", 8, 4), ("draft", 8, 1)} <= {s[:3] for s in shapes}, shapes


def test_graph_counters_in_stats(tiny_ds: str) -> None:
    """/get_server_info's graph counters (EngineStats): static layouts appear on first use of a shape
    (on CPU nothing is made at start-up) and repeat runs of the same shapes make none; without graphs
    all stay 0."""
    llm = LLM(tiny_ds, device="cpu", page_size=4, max_total_tokens=4096, cuda_graph_max_bs=8)  # (GPU: captured)
    before = llm.engine.stats()
    llm.generate(SHORT, GREEDY)
    warmed = llm.engine.stats()
    llm.generate(SHORT, GREEDY)
    again = llm.engine.stats()
    assert before.graph_shapes == 0 < warmed.graph_shapes == again.graph_shapes
    assert again.graph_captures == again.graph_eager_misses == 0  # CPU: nothing captured, nothing frozen
    off = LLM(tiny_ds, device="cpu", page_size=4, max_total_tokens=4096, cuda_graph_max_bs=0)
    off.generate(SHORT, GREEDY)
    stats = off.engine.stats()
    assert stats.graph_shapes == stats.graph_captures == stats.graph_eager_misses == 0


SAMPLED = {"temperature": 0.8, "top_p": 0.9}  # (the sampling kernel compiled at the first sampled request)


@pytest.mark.gpu
@pytest.mark.parametrize("arch,graphs,kv", [(ARCHS[0], None, "auto"), (ARCHS[1], None, "auto"), (ARCHS[0], 0, "auto"),
                                             (ARCHS[0], None, "fp8_e4m3")])
def test_nothing_compiles_or_captures_after_the_warm_up(arch: str, graphs: int | None, kv: str,
                                                         tiny_models: dict[str, str]) -> None:
    """The start-up warm-up leaves no Triton kernel variant and no graph to the served requests: under
    staggered arrivals (mixed steps: running requests decode beside prompt chunks of many lengths, decode
    batches of every size; greedy and top-p sampled) the counters /get_server_info reports stay where they were when it was ready.
    Without CUDA graphs (`--cuda-graph-max-bs 0`) the warm-up's own decode batches compile the decode shapes,
    and dummy steps the indexer's selection widths. Over an FP8 cache the tiny model's 8 heads take the Gluon
    sparse MLA from 4 rows on Hopper (mla._gluon) and Triton's narrow programs below."""
    llm = LLM(tiny_models[arch], page_size=64, max_total_tokens=40_000, chunked_prefill_size=2048,
              cuda_graph_max_bs=graphs, kv_cache_dtype=kv)
    engine = llm.engine
    ready = engine.stats()
    assert ready.kernel_compiles > 0 and (ready.graph_captures > 0) == (graphs is None)  # the counters count
    # alone, prompt and decode rows 300-330 keys wide: a selection width (512) no warm-up prompt reaches
    engine.add_request("alone", prompts_ids(1, [300], seed=44)[0], SamplingParams(max_tokens=30, temperature=0.0))
    engine.run_until_idle()
    lengths = [3, 17, 40, 64, 100, 129, 300, 517, 1000, 1500, 2500, 7, 2047, 33, 3000, 1]
    for i, ids in enumerate(prompts_ids(len(lengths), lengths, seed=43)):  # every third samples (top-p)
        engine.add_request(f"load-{i}", ids, SamplingParams(max_tokens=20 + 7 * i, ignore_eos=True, seed=i,
                                                            **SAMPLED if i % 3 == 1 else {"temperature": 0.0}))
        for _ in range(i % 4):
            engine.step()
    _served_without_compiling(engine, ready)


@pytest.mark.gpu
def test_eager_mtp_steps_of_any_size_compile_nothing_after_the_warm_up(tmp_path: Path) -> None:
    """FP8 weights, MTP and graphs only up to 4 requests: verify steps past 4 requests and the draft steps of
    mixed steps run eagerly at every size up to 40 rows, past index_topk keys (64 here) too, greedy and sampled.
    The counters stay where they were when the engine was ready. (On an H100, 2026-12-06, it passed with and without
    quant.warm_up_gemms: the tiny model's shapes do not reach the tile a V3.2 rank slice compiled after ready;
    test_fp8_kernels.py::test_the_gemm_warm_up_leaves_no_decode_row_count_to_compile checks that warm-up.)"""
    model = make_tiny_model(tmp_path / "fp8", ARCHS[0], fp8=True, index_topk=64)
    llm = LLM(str(model), page_size=64, max_total_tokens=60_000, chunked_prefill_size=512, cuda_graph_bs=(1, 2, 4),
              speculative_algorithm="NEXTN", speculative_num_steps=3)
    engine = llm.engine
    ready = engine.stats()
    for i, ids in enumerate(prompts_ids(40, [5 + 13 * (i % 9) for i in range(40)], seed=45)):
        engine.add_request(f"load-{i}", ids, SamplingParams(max_tokens=40, ignore_eos=True, seed=i,
                                                            **SAMPLED if i % 3 == 1 else {"temperature": 0.0}))
        engine.step()
    _served_without_compiling(engine, ready)


def _served_without_compiling(engine: Engine, ready: EngineStats) -> None:
    """Runs the engine's requests to the end: they took steps and gave their pages back, and the compile and
    capture counters stayed where they were at `ready` (the engine's stats when it was ready)."""
    engine.run_until_idle()
    after = engine.stats()
    assert after.steps > ready.steps and after.free_pages == after.total_pages
    assert (after.kernel_compiles, after.graph_captures, after.graph_eager_misses) == \
        (ready.kernel_compiles, ready.graph_captures, ready.graph_eager_misses)


def test_reused_bucket_turns_stale_rows_into_dummies(tiny_ds: str) -> None:
    """Invariant 1 for graphs: rows past the batch are whole dummy requests on the reserved page 0
    (token 0, position 0, one key, writing slot 0), whatever the bucket held before."""
    llm = LLM(tiny_ds, device="cpu", page_size=4, max_total_tokens=4096, cuda_graph_max_bs=8)
    runner = llm.engine.runner

    def step(n: int):
        pages = tuple((1 + 3 * i, 2 + 3 * i, 3 + 3 * i) for i in range(n))
        plan = StepPlan(StepMode.DECODE, tuple(f"r{i}" for i in range(n)), pages, (9,) * n, (1,) * n, (1,) * n,
                        (True,) * n, tuple(range(7, 7 + n)), (0,) * n)
        shape = StepShape((n,), (0,), 8, StepMode.DECODE, 1)
        plan, layout = runner.prepare(plan, shape)
        runner.target(torch.tensor(plan.input_ids), layout, graphed=True)
        return layout

    step(7)  # the bucket of 8 now holds 7 real rows
    small = step(5)
    (graph,) = runner.graphs.graphs.values()
    s = graph.layout
    assert s.out_slots[5:].tolist() == [0, 0, 0] and s.row_kv_len[5:, 0].tolist() == [1, 1, 1]
    assert s.row_pos[5:].tolist() == [0, 0, 0] and int(s.page_table[5:].abs().sum()) == 0
    assert graph.inputs["input_ids"][5:].tolist() == [0, 0, 0]
    for name in small.tensor_fields():  # every field of the step's layout, not a hand-picked few
        assert torch.equal(getattr(s, name), getattr(small, name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec,shared", [(0, False), (3, False), (3, True)])
def test_cuda_graph_replay_matches_eager(arch: str, spec: int, shared: bool, tiny_models: dict[str, str]) -> None:
    """shared: GLM-5.2's index sharing (the draft steps' graphs take the MTP pass's selection as an input)."""
    common = dict(device="cuda", dtype="float32", attention_backend="triton", moe_backend="triton",
                  page_size=64, max_total_tokens=8192)
    if spec:
        common |= dict(speculative_algorithm="NEXTN", speculative_num_steps=spec)
    if shared:
        common |= dict(json_model_override_args='{"index_share_for_mtp_iteration": true}')
    eager = LLM(tiny_models[arch], cuda_graph_max_bs=0, **common).generate(PROMPTS, GREEDY)
    llm = LLM(tiny_models[arch], cuda_graph_max_bs=8, **common)
    replayed = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in replayed] == [o.token_ids for o in eager]
    graphs = llm.engine.runner.graphs
    assert graphs.stats.captured == len(graphs.graphs) > 0
    assert graphs.stats.eager_misses == 0  # rows crossing key widths (with MTP's lookahead pages) found a graph


def test_lookahead_pages_do_not_widen_a_graph_layout(tiny_ds: str) -> None:
    """With MTP a request holds pages for 2S tokens past its cache while a verify step's keys end S + 1 past
    it, so near a key-width boundary it holds a page more than that width's page table. The graphed layout
    keeps the width's table (those pages are not read in the step): one graph per (function, batch, rows,
    key width). A wider second one meant a step run eagerly on a GPU once the start-up capture was frozen."""
    llm = LLM(tiny_ds, device="cpu", page_size=4, max_total_tokens=4096, cuda_graph_max_bs=4,
              speculative_algorithm="NEXTN", speculative_num_steps=3)
    topk = llm.engine.runner.cfg.index_topk
    llm.generate(prompts_ids(4, [topk - 9, topk - 8, topk - 7, topk - 6], seed=45), GREEDY)
    graphs = llm.engine.runner.graphs
    shapes = [(key[0], g.layout.batch_size, g.layout.num_tokens // g.layout.batch_size, g.layout.key_width)
              for key, g in graphs.graphs.items()]
    assert any(width > topk for *_, width in shapes)  # the rows crossed a key-width boundary
    assert len(shapes) == len(set(shapes)), sorted(shapes)


def test_mtp_runs_to_the_context_length_on_graphs(tiny_ds: str) -> None:
    """With MTP a request decoding up to the context length has verify and draft rows whose keys reach up to 2S
    past its last token: the graphs' key widths cover them, so the run ends at the context length as the
    eager one does (the widths stopped at the context length, and the step failed)."""
    common = dict(device="cpu", page_size=4, max_total_tokens=4096, context_length=64,
                  speculative_algorithm="NEXTN", speculative_num_steps=3)
    prompts = prompts_ids(2, [30, 33], seed=3)
    to_the_end = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    eager = LLM(tiny_ds, cuda_graph_max_bs=0, **common).generate(prompts, to_the_end)
    graphed = LLM(tiny_ds, cuda_graph_max_bs=4, **common).generate(prompts, to_the_end)
    assert [o.finish_reason.kind for o in graphed] == ["length", "length"]
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
