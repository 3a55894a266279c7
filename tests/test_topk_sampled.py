"""The sampled top-k (ops/triton/topk_sampled.py: many wide rows, one program each) against the stated rule
(GPU only; skipped cleanly on CPU or without triton). Outputs are poisoned, so an unwritten slot shows. The
cases include rows the sample misses (many equal keys, all-equal rows: the passes over the row in memory) and
ordered rows (sorted, trending); the slots must come in position order, as the row kernel stores them.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.ops.triton import topk, topk_sampled  # noqa: E402
from test_topk_split import _rows, _rule_slots, check_against_the_rule, poison  # noqa: E402, F401 (poison: autouse)

pytestmark = pytest.mark.gpu
DEV = "cuda"


CASES = [  # lens, width, k, page, kind
    ([32768 - 37 * i for i in range(40)], 32768, 2048, 64, "normal"),  # a prefill chunk's rows
    ([40000, 2049, 33000, 2048, 100, 4096, 4097], 65536, 2048, 64, "normal"),  # at, under and past k and CAP
    ([16384, 9000], 16384, 2048, 1, "ties"),
    ([70000], 131072, 2048, 64, "ties"),
    ([12000, 5000, 3000], 16384, 2048, 64, "equal"),
    ([9000, 300000], 300000, 512, 64, "nan"),  # a sample of 1024 from 300K keys
    ([20000, 8192], 20000, 2048, 64, "sorted"),
    ([30000, 25000, 12000], 32768, 2048, 64, "trend"),
    ([5000, 3000, 2500], 8192, 100, 16, "normal"),  # k not a power of two
    ([900, 700, 65], 1024, 16, 1, "ties"),  # a tiny model's k
    ([40000, 9000], 40000, 8192, 64, "normal"),  # the widest k: 16,384 candidates
    ([30000, 6000], 32768, 2048, 64, "zeros"),  # +0.0 / -0.0 at the threshold: +0.0 ranks above
]


def test_the_sample_that_finds_too_few_keys_takes_the_passes():
    """A row whose sampled positions hold its largest values (every CAP-th position in a row of equal values
    below): the threshold keeps fewer than k keys, so the row selects by the passes over it."""
    k, width = 2048, 32768
    size = topk_sampled.sample_size(k, width)
    x, kv, page_table, row_req = _rows([width], width, 64, 7, "equal")
    x[0, (torch.arange(size, device=DEV) * width) // size] = 1.0
    got = topk_sampled.sampled_topk_slots(x, kv, page_table, row_req, 64, k)
    assert got[0].tolist() == _rule_slots(x, kv, page_table, 64, k)[0]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sampled_topk_slots(case):
    lens, width, k, page, kind = CASES[case]
    x, kv, page_table, row_req = _rows(lens, width, page, case, kind)
    got = topk_sampled.sampled_topk_slots(x, kv, page_table, row_req, page, k)
    check_against_the_rule(got, x, kv, page_table, row_req, page, k, kind, in_position_order=True)


def test_sampled_equals_the_row_kernel_in_a_cuda_graph():
    """Captured once, replays select each new batch's rows (past CAP keys by the sample, up to it all keys as
    candidates); the slots equal the row kernel's, order included."""
    lens, width, k = [topk.ROW_LIMIT - 300 * i for i in range(24)], topk.ROW_LIMIT, 2048
    x, kv, page_table, row_req = _rows(lens, width, 64, 0, "normal")
    topk_sampled.sampled_topk_slots(x, kv, page_table, row_req, 64, k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_sampled.sampled_topk_slots(x, kv, page_table, row_req, 64, k)
    for seed, kind in enumerate(["normal", "ties", "trend"]):
        fresh, *_ = _rows(lens, width, 64, 10 + seed, kind)
        x.copy_(fresh)
        graph.replay()
        assert torch.equal(out, topk.row_topk_slots(x, kv, page_table, row_req, 64, k)), f"replay {seed} ({kind})"
