"""The indexer on a second CUDA stream (model/dsa.py MLAttention._side_stream) changes no result.

The two streams run the same kernels on the same inputs; only their order on the GPU differs. A race (the
attention reading a top-k the side stream has not finished, a buffer reused while the other stream reads it)
would change tokens or log-probs, so the runs must agree exactly: greedy tokens and top-2 log-probs of every
step, with CUDA graphs (decode) and eagerly (checked mode off: its value reads would sync the streams),
prompts longer than the tiny models' index_topk (16) so that the indexer scores keys. (The tiny models' GEMMs
never split K: scratch that two streams' kernels must not share is tested at the kernels,
test_fp8_kernels.py::test_split_k_gemms_on_two_streams_keep_their_own_tickets.)
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from test_triton_engine import _greedy  # noqa: E402

from dsaserve.model import dsa  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPT_LENGTHS = [40, 90, 23, 200, 7, 130]


def _run(path: str, kv: str, graphs: bool, taken: list[bool]) -> list[tuple[list[int], list]]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 500, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    taken.clear()  # graphs are captured while the engine starts
    return _greedy(path, "triton", "bfloat16", prompts, kv, cuda_graph_max_bs=None if graphs else 0)


@pytest.mark.parametrize("arch,kv,graphs", [("deepseek_v32", "auto", True), ("glm_moe_dsa", "fp8_e4m3", True),
                                             ("deepseek_v32", "fp8_e4m3", False)])
def test_the_indexer_on_a_side_stream_changes_nothing(arch: str, kv: str, graphs: bool, tiny_models: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSASERVE_CHECKS", "0")  # its value reads would sync the streams: less overlap to test
    taken: list[bool] = []
    choose = dsa.MLAttention._side_stream

    def spy(self: dsa.MLAttention, ctx: dsa.StepContext, T: int) -> torch.cuda.Stream | None:
        side = choose(self, ctx, T)
        taken.append(side is not None)
        return side

    monkeypatch.setattr(dsa.MLAttention, "_side_stream", spy)
    overlapped = _run(tiny_models[arch], kv, graphs, taken)
    assert any(taken), "no layer ran its indexer on the side stream"
    monkeypatch.setattr(dsa, "SIDE_STREAM_ROWS", 0)  # every step on one stream
    in_order = _run(tiny_models[arch], kv, graphs, taken)
    assert not any(taken)
    for i, ((toks, lps), (ref_toks, ref_lps)) in enumerate(zip(overlapped, in_order)):
        assert toks == ref_toks, f"prompt {i}: tokens differ at step {next(j for j, (a, b) in enumerate(zip(toks, ref_toks)) if a != b)}"
        assert lps == ref_lps, f"prompt {i}: log-probs differ"
