"""FP8 e4m3 checkpoints with 128x128 weight_scale_inv blocks load and match their dequantized weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.ops.fp8 import dequantize
from dsaserve.tiny import make_tiny_model


def _dequantize_checkpoint(src: Path, dst: Path) -> None:
    """Independent dequantization: expand every scale over its 128x128 block with explicit loops."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    (dst / "config.json").write_text(json.dumps(config))
    shards = {f.name: load_file(f) for f in src.glob("*.safetensors")}
    scales = {n[: -len("_scale_inv")]: t for s in shards.values() for n, t in s.items() if n.endswith("_scale_inv")}
    weight_map = {}
    for name, tensors in shards.items():
        out = {}
        for n, t in tensors.items():
            if n.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                w = t.float()
                s = scales[n]
                for i in range(s.shape[0]):
                    for j in range(s.shape[1]):
                        w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= s[i, j]
                t = w
            out[n] = t
            weight_map[n] = name
        save_file(out, str(dst / name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_fp8_checkpoint_matches_dequantized(tmp_path: Path) -> None:
    fp8 = make_tiny_model(tmp_path / "fp8", "deepseek_v32", fp8=True)
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith("weight_scale_inv") for n in index)
    _dequantize_checkpoint(fp8, tmp_path / "deq")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = prompts_ids(3, [4, 19, 30], seed=5)
    a = LLM(str(fp8), page_size=4, max_total_tokens=2048).generate(prompts, params)
    b = LLM(str(tmp_path / "deq"), page_size=4, max_total_tokens=2048).generate(prompts, params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_dequantize_partial_blocks() -> None:
    w = torch.randn(40, 70)
    scale = torch.rand(3, 5) + 0.5
    q = w.to(torch.float8_e4m3fn)
    got = dequantize(q, scale, (16, 16))
    for i in range(40):
        for j in range(70):
            assert got[i, j] == q[i, j].float() * scale[i // 16, j // 16]
