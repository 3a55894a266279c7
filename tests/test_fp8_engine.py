"""The engine with FP8 weights on CUDA: e4m3 weights stay e4m3 in device memory, and the Triton FP8
kernels (CUDA graphs on) give the tokens of the same FP8 function computed in plain PyTorch.

FP8 activations (e4m3 per token and 128 channels) are part of that function, so the reference is the
torch emulation of the kernels (model/quant.py "emulate"), not the dequantized checkpoint: on the tiny
random models FP8 activations move logits far more than bf16 does. The criteria are those of
test_triton_engine: against the fp32 emulation as truth, the kernels (in fp32 and in bf16) are no less
accurate than the emulation run in bf16, and their tokens part from it only at near-ties.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from dsaserve import LLM  # noqa: E402
from dsaserve.model import quant  # noqa: E402
from dsaserve.ops.fp8 import FP8  # noqa: E402
from dsaserve.tiny import make_tiny_model  # noqa: E402
from test_triton_engine import _greedy, _prompts, check_run  # noqa: E402

pytestmark = pytest.mark.gpu
ARCHS = ["deepseek_v32", "glm_moe_dsa"]


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp8-gpu")
    return {arch: str(make_tiny_model(Path(root) / arch, arch, fp8=True)) for arch in ARCHS}


def _check_norms_hand_over_quantized_rows(model: torch.nn.Module) -> None:
    """Decode-sized steps: the norms before the FP8 GEMMs write their rows quantized too, and the GEMMs read them
    (flipped signs give minus the product); prefill-sized steps do not ask."""
    layer = model.layers[0]
    attn = layer.self_attn
    for consumer in (attn, attn.q_b_proj, layer.mlp):
        assert consumer.input_group(1) == consumer.input_group(64) == 128 and consumer.input_group(65) == 0
    h = torch.randn(4, model.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    x, _, xq = layer.input_layernorm.add_forward(h, None, attn.input_group(4))
    assert xq is not None and xq.values.shape == x.shape
    flipped = quant.fp8.QuantizedRows((-xq.values.float()).to(FP8), xq.scales, xq.group)
    projection = attn.input_proj or attn.q_a_proj
    assert torch.equal(projection(x, flipped), -projection(x, xq))
    assert torch.equal(projection(x, xq), projection(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_weights_stay_fp8_on_cuda(arch: str, fp8_models: dict[str, str]) -> None:
    llm = LLM(fp8_models[arch], device="cuda", dtype="bfloat16", mem_fraction=0.3)
    try:
        model = llm.engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, quant.Linear) and m.block is not None]
        experts = [m for m in model.modules() if isinstance(m, quant.Experts)]
        assert linears and experts
        for m in linears:
            assert m.weight.dtype == FP8 and m.weight.is_cuda and m.gemm is not None and m._dequantized is None
        for m in experts:
            assert m.w13.dtype == m.w2.dtype == FP8 and m.kernels and m._dequantized is None
        for layer in model.layers:  # read as a matrix by the absorbed MLA: dequantized once at load
            assert layer.self_attn.kv_b_proj.weight.dtype == torch.bfloat16
        _check_norms_hand_over_quantized_rows(model)
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kernels_match_torch_emulation(arch: str, fp8_models: dict[str, str]) -> None:
    prompts = _prompts(3)
    path = fp8_models[arch]
    truth = _greedy(path, "torch", "float32", prompts, fp8_mode="emulate")
    emulated_bf16 = _greedy(path, "torch", "bfloat16", prompts, fp8_mode="emulate")
    # Hopper's FP8 tensor cores accumulate each 128-wide group in less than fp32 precision, and the
    # next layer's e4m3 activation rounding amplifies that: even in fp32 the kernels are held to the
    # noise of the same function in bf16, not to fp32 agreement.
    for dtype in ("float32", "bfloat16"):
        kernels = _greedy(path, "triton", dtype, prompts)
        check_run(f"{arch} FP8 Triton {dtype} vs torch emulation bf16", truth, emulated_bf16, kernels)
