"""The split top-k (ops/triton/topk_split.py: few long rows, each over many programs) against the reference
selection (GPU only; skipped cleanly on CPU or without triton). Outputs are poisoned, so an unwritten slot
shows; ties are checked against the stated rule (equal values: lowest positions first), not only by value.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops.triton import _common, topk_split  # noqa: E402
from dsaserve.ops.triton import indexer as tindexer  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def poison():
    _common.POISON = True
    yield
    _common.POISON = False


def _rows(lens: list[int], width: int, page: int, seed: int, kind: str):
    """Logits [T, width] (-inf past each kv_len), shuffled pages, one request per row."""
    gen = torch.Generator(DEV).manual_seed(seed)
    T, pages = len(lens), -(-width // page)
    page_table = torch.randperm(T * pages, device=DEV, generator=gen).int().reshape(T, pages)
    row_req = torch.arange(T, dtype=torch.int32, device=DEV)
    kv = torch.tensor(lens, dtype=torch.int32, device=DEV)[:, None]
    x = torch.randn(T, width, device=DEV, generator=gen)
    if kind == "ties":  # few distinct values: the threshold bin holds thousands of equal keys
        x = x.mul(2).round()
    elif kind == "equal":
        x = torch.zeros_like(x)
    elif kind == "zeros":  # zeros of both signs above negative integers: the threshold falls among the zeros
        x = -x.mul(2).round().abs()
        x = torch.where(x == 0, torch.where(torch.rand(x.shape, device=DEV, generator=gen) < 0.5, -0.0, 0.0), x)
    elif kind == "nan":
        x[:, 7] = float("nan")
    pos = torch.arange(width, device=DEV)[None, :]
    if kind == "sorted":  # ascending: the largest keys sit at the end of the row
        x = pos.float().expand(T, width) / width
    elif kind == "trend":  # recent keys score higher, with noise
        x = x + 4.0 * pos / width
    x = x.masked_fill(pos >= kv, float("-inf"))
    return x, kv, page_table, row_req


def _rule_slots(x: torch.Tensor, kv: torch.Tensor, page_table: torch.Tensor, page: int, k: int) -> list[list[int]]:
    """Each row's slots by the stated rule (largest first, NaN above all, +0.0 above -0.0, equal values lowest
    position first), listed in position order."""
    bits = x.view(torch.int32).long()
    order = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)  # topk._order_keys, as int64
    order = order.masked_fill(x.isnan(), 1 << 32)
    out = []
    for r in range(x.shape[0]):
        n = int(kv[r])
        chosen = torch.sort(-order[r, :n].cpu(), stable=True).indices[:k].sort().values.to(DEV)  # ties: by position
        out.append((page_table[r].long()[chosen // page] * page + chosen % page).tolist())
    return out


CASES = [  # lens, width, k, page, kind
    ([8192], 8192, 2048, 64, "normal"),
    ([40000, 2049, 33000, 2048, 100], 65536, 2048, 64, "normal"),  # rows at, under and past k
    ([16384, 9000], 16384, 2048, 1, "ties"),
    ([70000], 131072, 2048, 64, "ties"),
    ([12000, 5000], 16384, 2048, 64, "equal"),  # one bin, every key a candidate: the looped path
    ([9000], 16384, 512, 64, "nan"),
    ([5000, 3000, 2500], 8192, 100, 16, "normal"),  # k not a power of two
    ([16384 - 1100 * i for i in range(12)], 16384, 2048, 64, "normal"),  # more than FEW_ROWS: wider rank blocks
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_topk_slots(case):
    lens, width, k, page, kind = CASES[case]
    x, kv, page_table, row_req = _rows(lens, width, page, case, kind)
    got = topk_split.split_topk_slots(x, kv, page_table, row_req, page, k)
    check_against_the_rule(got, x, kv, page_table, row_req, page, k, kind, in_position_order=False)
    assert not topk_split._histograms(x.device).any(), "the histograms are not cleared for the next call"


def check_against_the_rule(got: torch.Tensor, x: torch.Tensor, kv: torch.Tensor, page_table: torch.Tensor,
                           row_req: torch.Tensor, page: int, k: int, kind: str, in_position_order: bool) -> None:
    """Valid slots first, then -1; each row's the rule's (_rule_slots: as a set, or in position order); with
    distinct values ("normal") the reference's set too."""
    n_valid = kv[:, 0].clamp(max=k)
    assert ((got >= 0) == (torch.arange(k, device=DEV)[None, :] < n_valid[:, None])).all(), "valid slots, then -1"
    want = _rule_slots(x, kv, page_table, page, k)
    for r in range(got.shape[0]):
        chosen = got[r, : int(n_valid[r])].tolist()
        if in_position_order:
            assert chosen == want[r], f"row {r}: not the rule's slots in position order"
        else:
            assert set(chosen) == set(want[r]), f"row {r}: selected set differs from the rule"
    if kind == "normal":
        ref_slots = ref.topk_slots(x, kv, page_table, row_req, page, k)
        assert torch.equal(got.sort(dim=1).values, ref_slots.sort(dim=1).values)


def test_split_topk_in_a_cuda_graph_and_the_dispatch():
    """Replays of a captured call select each new row's set (the histograms start at 0 every replay), and
    indexer.topk_slots takes this path for few long rows."""
    lens, width, k = [30000, 20000], 32768, 2048
    x, kv, page_table, row_req = _rows(lens, width, 64, 0, "normal")
    assert topk_split.fits(len(lens), width)
    capture = torch.cuda.Stream()  # the histograms are made outside the graph, for the capturing stream
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):
        topk_split.split_topk_slots(x, kv, page_table, row_req, 64, k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        out = tindexer.topk_slots(x, kv, page_table, row_req, 64, k)
    for seed in range(3):
        fresh, *_ = _rows(lens, width, 64, 10 + seed, "ties" if seed == 1 else "normal")
        x.copy_(fresh)
        graph.replay()
        want = _rule_slots(x, kv, page_table, 64, k)
        assert all(set(out[r].tolist()) == set(want[r]) for r in range(len(lens))), f"replay {seed}"


WARM_CHECK = """
import torch
from dsaserve.engine.compiles import kernel_compiles
from dsaserve.ops.triton import indexer
dev = torch.device("cuda")
indexer.warm_selection(dev, 2048, 64, 40000)
before = kernel_compiles()
for rows in (1, 2, 8, 9, 16, 17, 32, 33, 100):
    for width in (2500, 4096, 6000, 8192, 12000, 16384, 30000, 32768, 40002):
        x = torch.randn(rows, width, device=dev)
        kv = torch.full((rows, 1), width, dtype=torch.int32, device=dev)
        pt = torch.arange(-(-width // 64), dtype=torch.int32, device=dev)[None]
        indexer.topk_slots(x, kv, pt, torch.zeros(rows, dtype=torch.int32, device=dev), 64, 2048)
torch.cuda.synchronize()
print("compiles after the warm-up:", kernel_compiles() - before)
"""


def test_the_selection_warm_up_compiles_every_variant():
    """In a fresh process (nothing compiled yet): after indexer.warm_selection, selections of any row count
    and width up to its max_keys compile nothing (the split path's rank blocks, the row kernel's widths, the
    slot kernel behind torch.topk)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", WARM_CHECK], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiles after the warm-up: 0" in out.stdout, out.stdout + out.stderr[-3000:]
