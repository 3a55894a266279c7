"""`dsaserve make-tiny-model` replaces its output folder as a whole (dsaserve/replace_folder.py, as train-tiny):
an interrupted run leaves the old checkpoint, a finished one leaves nothing of it, and a folder holding files it
does not write is refused and left as it was."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import WriteStopped, stop_writing_at
from dsaserve.cli import main
from dsaserve.tiny import make_tiny_model


def _contents(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_a_run_stopped_while_writing_leaves_the_folder_as_it_was(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the new shards and config.json are written, before the tokenizer: the folder must still be the
    old checkpoint (not new weights beside an old tokenizer, which loads and serves garbage), and no partial folder
    is left beside it."""
    out = make_tiny_model(tmp_path / "tiny")
    before = _contents(out)
    stop_writing_at(monkeypatch, "generation_config.json")
    with pytest.raises(WriteStopped):
        make_tiny_model(out, seed=1, layers=2)
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_finished_run_replaces_the_whole_folder(tmp_path: Path) -> None:
    """Fewer layers write fewer shards, named by their count: the old run's shards went on lying beside the new
    ones. Now the folder is the new checkpoint alone, and nothing is left beside it."""
    out = make_tiny_model(tmp_path / "tiny", layers=3)
    assert len(list(out.glob("*.safetensors"))) == 5
    make_tiny_model(out, layers=1)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors"
                                                                   for i in (1, 2, 3)]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("files,words", [
    (["README.md", "config.json"], "holds README.md, not checkpoint files"),
    (["notes.json"], "is not a make-tiny-model output (it does not write notes.json)"),
    (["config.json", "training_report.json"], "(it does not write training_report.json)"),  # train-tiny's
])
def test_a_folder_holding_files_it_does_not_write_is_refused(tmp_path: Path, files: list[str], words: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The folder is deleted as a whole when replaced: one holding anything make-tiny-model does not write (a
    README, JSON files of one's own, a trained model) is refused, in one line from the CLI, and left as it was."""
    for name in files:
        (tmp_path / name).write_text("mine")
    assert main(["make-tiny-model", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err
    assert _contents(tmp_path) == {name: b"mine" for name in files}


def test_the_fp8_block_flag_reaches_the_checkpoint(tmp_path: Path) -> None:
    """`--fp8-block 8`: a tiny FP8 checkpoint whose widths split on whole blocks at --tp 2 and 4 (the official 128 x 128
    blocks cannot split them: the engine refuses, naming the tensor)."""
    assert main(["make-tiny-model", str(tmp_path / "m"), "--fp8", "--fp8-block", "8"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [8, 8]
    assert main(["make-tiny-model", str(tmp_path / "n"), "--fp8", "--fp8-block", "0"]) == 2
