"""--json-model-override-args (SGLang's flag): its fields replace config.json's wherever the model's config is
read (engine, launch checks, planner, the PD weights id), as if config.json had been edited."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.cli import main
from dsaserve.model.checkpoint import weights_fingerprint
from dsaserve.server_args import ServerArgs

OVERRIDE = {"index_topk": 8, "rope_theta": 5000.0}  # selection active from 9 keys on; other positions' rotations


def _edited_copy(model: str, folder: Path, fields: dict) -> str:
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return str(folder)


def test_an_override_serves_as_the_edited_config_json(tiny_ds: str, tmp_path: Path) -> None:
    edited = _edited_copy(tiny_ds, tmp_path / "edited", OVERRIDE)
    prompts = prompts_ids(3, [30, 12, 21], seed=4)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    runs = {}
    for name, path, flag in (("override", tiny_ds, json.dumps(OVERRIDE)), ("edited", edited, None),
                             ("plain", tiny_ds, None)):
        llm = LLM(path, page_size=1, max_total_tokens=1024, json_model_override_args=flag)
        runs[name] = [c.token_ids for c in llm.generate(prompts, greedy)]
        if name != "plain":
            assert (llm.engine.cfg.index_topk, llm.engine.cfg.rope.theta) == (8, 5000.0)
    assert runs["override"] == runs["edited"]
    assert runs["override"] != runs["plain"]  # (the rotations alone move every logit of these prompts)
    # PD servers pair only when they serve one model: the override counts as config.json's
    assert weights_fingerprint(tiny_ds, overrides=OVERRIDE) == weights_fingerprint(edited)
    assert weights_fingerprint(tiny_ds) != weights_fingerprint(edited)


@pytest.mark.parametrize("flag,message", [("{", "--json-model-override-args is not valid JSON"),
                                          ("[1]", "--json-model-override-args must be a JSON object"),
                                          ('{"model_type": "glm_moe_dsa"}', "cannot change model_type")])
def test_bad_overrides_are_named(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs(json_model_override_args=flag)


@pytest.mark.parametrize("topk", [0, -1])
def test_an_index_topk_below_one_is_refused_at_start_up(tiny_ds: str, topk: int,
                                                        capsys: pytest.CaptureFixture) -> None:
    """-1 used to start and then fail every batch (a [rows, -1] tensor: 500s); 0 served text that ignores the
    prompt (no key selected)."""
    override = ["--json-model-override-args", json.dumps({"index_topk": topk})]
    assert main(["plan", "--model-path", tiny_ds, *override]) == 2
    assert f"index_topk must be >= 1, got {topk}" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ({"rope_scaling": 5}, "config.json field 'rope_scaling' must be an object, got 5"),
    ({"vocab_size": [1]}, "config.json field 'vocab_size' must be a number, got [1]"),
    ({"quantization_config": "fp8"}, "config.json field 'quantization_config' must be an object, got 'fp8'"),
    ({"max_position_embeddings": "abc"}, "config.json field 'max_position_embeddings' must be a number, got 'abc'"),
    ({"mlp_layer_types": 5}, "cannot be read: "),
])
def test_a_config_field_of_the_wrong_type_is_named(tiny_ds: str, override: dict, message: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    """One line and exit 2, as for any config.json the server cannot serve (these were tracebacks and exit 1)."""
    assert main(["plan", "--model-path", tiny_ds, "--json-model-override-args", json.dumps(override)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_launch_checks_read_the_overridden_config(tiny_ds: str, capsys: pytest.CaptureFixture) -> None:
    override = ["--json-model-override-args", '{"max_position_embeddings": 64}']
    assert main(["plan", "--model-path", tiny_ds, "--context-length", "100", *override]) == 2
    assert "--context-length 100 is longer than the model's 64" in capsys.readouterr().err
    assert main(["plan", "--model-path", tiny_ds, "--context-length", "100"]) == 0
