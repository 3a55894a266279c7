"""`--load-format dummy`: a model folder with config.json and tokenizer files but no weights serves with
random weights in the formats a checkpoint of that config would have (FP8 included), counted exactly as
the planner counts them; `dsaserve bench one-batch` runs on it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsaserve import LLM, SamplingParams
from dsaserve.config import ModelConfig
from dsaserve.model import quant
from dsaserve.model.checkpoint import default_model_path
from dsaserve.planner import plan, weight_bytes
from dsaserve.server_args import ServerArgs
from dsaserve.tiny import make_tiny_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _without_weights(model: Path, out: Path) -> str:
    out.mkdir()
    for f in model.glob("*.json"):
        if "safetensors" not in f.name:
            shutil.copy(f, out / f.name)
    assert not list(out.glob("*.safetensors*"))
    return str(out)


@pytest.mark.parametrize("fp8", [False, True])
def test_dummy_weights_without_a_checkpoint(fp8: bool, tmp_path: Path) -> None:
    source = make_tiny_model(tmp_path / "ckpt", fp8=True) if fp8 else default_model_path()
    path = _without_weights(Path(source), tmp_path / "bare")
    llm = LLM(path, load_format="dummy", page_size=4, max_total_tokens=2048, dtype="float32")
    model = llm.engine.runner.model
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    fp8_modules = [m for m in model.modules() if isinstance(m, (quant.Linear, quant.Experts)) and m.block]
    assert bool(fp8_modules) == fp8  # the config's quantization_config decides the formats
    for m in fp8_modules:
        if isinstance(m, quant.Experts) and m.padded:  # the gap of padded FP8 experts stays zero
            assert not m.w2.data[:, :, m.inter:].view(torch.uint8).any()
    out = llm.generate([[5, 6, 7, 8, 9], [11, 12]], GREEDY)
    assert all(len(o.token_ids) == 6 for o in out)
    args = ServerArgs(model_path=path, dtype="float32", load_format="dummy")
    planned = plan(ModelConfig.from_path(path), args, device_bytes=1 << 40).weights
    assert planned == weight_bytes(model)  # one accounting: what the planner counts is what dummy made


def test_bench_one_batch_on_dummy_weights_two_ranks(tmp_path: Path) -> None:
    """One process, then --tp 2 --ep 2 (two rank processes; it used to run the whole model in one, ignoring --tp):
    a rank's decode step reads fewer weight bytes than the whole model's (its heads, half the experts)."""
    path = _without_weights(default_model_path(), tmp_path / "bare")
    step_mb = []
    for ranks in ([], ["--tp", "2", "--ep", "2"]):
        run = subprocess.run([sys.executable, "-m", "dsaserve", "bench", "one-batch", "--model-path", path,
                              "--load-format", "dummy", "--batch-size", "2", "--input-len", "20",
                              "--output-len", "4", "--page-size", "4", "--max-total-tokens", "2048", *ranks],
                             capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.splitlines()
        row = lines[next(i for i, line in enumerate(lines) if "decode tok/s" in line) + 1].split()
        step_mb.append(float(row[-4]))  # (step MB, roofline, compiles, retracted end the row)
    assert step_mb[1] < 0.75 * step_mb[0], step_mb


def test_load_format_is_checked() -> None:
    with pytest.raises(ValueError, match="--load-format must be auto or dummy, got 'pt'"):
        ServerArgs(load_format="pt")
