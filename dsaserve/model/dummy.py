"""`--load-format dummy`: random weights in the formats a real checkpoint of the same config.json would
load into (FP8 where its quantization_config says), so a real config can be benchmarked or served
without downloading its weights (the tokenizer files are still read). Every rank draws from the same
seed, so replicated parameters agree across a TP group.

Scales keep activations in range through any number of layers: matrices ~ N(0, 1 / fan_in), norms 1,
biases 0, e4m3 values ~ N(0, 1) with block scales 1 / sqrt(fan_in).
"""
from __future__ import annotations

import torch
from torch import nn

from dsaserve.model.quant import Experts
from dsaserve.ops.fp8 import FP8

_CHUNK = 1 << 24  # values drawn at a time: an expert stack is generated in slices, not all in fp32 at once
_ONES = ("norm.weight", "layernorm.weight")
_ZEROS = ("bias", "e_score_correction_bias")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    params = dict(model.named_parameters())
    gen: dict[torch.device, torch.Generator] = {}
    for name, p in params.items():
        data = p.data
        if name.endswith(_ONES):
            data.fill_(1.0)
        elif name.endswith(_ZEROS) or data.dim() < 2:
            data.zero_()
        elif name.endswith("_scale_inv"):  # the block scales of the e4m3 tensor named without the suffix
            data.fill_(params[name[:-len("_scale_inv")]].shape[-1] ** -0.5)
        else:
            if data.device not in gen:
                gen[data.device] = torch.Generator(data.device).manual_seed(seed)
            std = 1.0 if data.dtype == FP8 else data.shape[-1] ** -0.5
            _fill_normal(data, std, gen[data.device])
    for module in model.modules():  # FP8 experts padded to whole blocks: the gap stays zero (quant.Experts)
        if isinstance(module, Experts) and module.padded:
            inter, padded = module.inter, module.padded_inter
            for gap in (module.w13.data[:, inter:padded], module.w13.data[:, padded + inter:],
                        module.w2.data[:, :, inter:]):
                (gap.view(torch.uint8) if gap.dtype == FP8 else gap).zero_()


def _fill_normal(data: torch.Tensor, std: float, gen: torch.Generator) -> None:
    rows = data.reshape(-1, data.shape[-1])
    step = max(1, _CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step]
        part.copy_(torch.randn(part.shape, generator=gen, device=data.device).mul_(std))
