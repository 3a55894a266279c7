"""`dsaserve train-tiny` as a command: what a long run shows while it runs, what a stopped run leaves, and who
can read what it writes.

Each test stops the toy-scale preset (`--preset test`) early, or runs it cut to one step a stage (`quick`), so
it takes seconds.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import WriteStopped, stop_writing_at
from dsaserve.cli import main
from dsaserve.model.checkpoint import default_model_path
from dsaserve.tiny import _save_sharded
from dsaserve.train_tiny import PRESETS, REPORT, train_tiny
from dsaserve.train_tiny.recipe import Stage


class _Stop(Exception):
    """Raised from the run's output: the run ends there, as a Ctrl-C would."""


class _StopAtFirstWrite(io.RawIOBase):
    """A non-terminal stdout (a file or a pipe, as under nohup or `| tee`) that stops the run when bytes reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if not self.stopped:
            self.stopped = True
            raise _Stop(bytes(data).decode())
        return len(data)


def test_progress_reaches_a_redirected_stdout_while_the_run_goes_on(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Python block-buffers stdout that is not a terminal: unflushed, `train-tiny out > log` (31 minutes for the
    shipped preset) shows no progress until it ends."""
    stdout = io.TextIOWrapper(io.BufferedWriter(_StopAtFirstWrite()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(_Stop, match="^corpus: "):
        main(["train-tiny", str(tmp_path / "out"), "--preset", "test"])


def test_a_stopped_run_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    """Retraining into an existing checkpoint (the README's command writes the shipped folder) and stopping it
    midway must not leave the new run's tokenizer beside the old weights: that folder loads and serves garbage."""
    shipped, out = default_model_path(), tmp_path / "tiny-dsa"
    shutil.copytree(shipped, out)

    def stop_at_training(line: str) -> None:
        if " step " in line:
            raise _Stop(line)

    with pytest.raises(_Stop):
        train_tiny(out, preset="test", log=stop_at_training)
    for file in sorted(shipped.iterdir()):
        assert (out / file.name).read_bytes() == file.read_bytes(), f"{file.name} was changed by the stopped run"


def test_shards_are_as_readable_as_the_rest_of_the_checkpoint(tmp_path: Path) -> None:
    """safetensors writes its files 0600: a checkpoint trained as one user (root, CI) and served as another
    could read its config and tokenizer but not its weights. Shards follow the umask like the other files."""
    _save_sharded(tmp_path, {"a": torch.zeros(2), "b": torch.ones(2)}, shards=2)
    index_mode = stat.S_IMODE((tmp_path / "model.safetensors.index.json").stat().st_mode)
    for shard in sorted(tmp_path.glob("*.safetensors")):
        assert stat.S_IMODE(shard.stat().st_mode) == index_mode, f"{shard.name}: {oct(shard.stat().st_mode)}"


def test_the_callers_thread_count_is_restored(tmp_path: Path) -> None:
    """train-tiny sets torch's thread count for reproducibility; run in-process (a test, a library call), it must
    hand the caller's back, whether the run ends or is stopped."""
    caller = torch.get_num_threads()
    torch.set_num_threads(3)  # not the run's 1, nor a machine's default
    try:
        with pytest.raises(_Stop):
            train_tiny(tmp_path / "out", preset="test", threads=1, log=_stop_at_first_line)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)


def _stop_at_first_line(line: str) -> None:
    raise _Stop(line)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> str:
    """The test preset cut to one step a stage and one evaluation window: a whole run, export included, in ~4 s."""
    p = PRESETS["test"]
    monkeypatch.setitem(PRESETS, "test", dataclasses.replace(
        p, stages=tuple(Stage(s.mode, 1, 1, s.seq_len) for s in p.stages), eval_windows=1))
    return "test"


def test_the_callers_global_rng_is_restored(tmp_path: Path, quick: str) -> None:
    """train-tiny seeds torch's global RNG for reproducibility; run in-process, it must leave the caller's RNG state
    as it was (a test or notebook drawing random numbers after it would otherwise draw the run's seeded ones)."""
    before = torch.random.get_rng_state()
    train_tiny(tmp_path / "out", preset=quick, log=lambda line: None)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_one_window_report_is_strict_json(tmp_path: Path, quick: str) -> None:
    """On one evaluation window the barely trained model is right at no position, so the MTP accept rate counts no
    cases: NaN, which json.dumps wrote as `NaN`, not JSON (jq, JSON.parse and other strict parsers refuse the
    report). A rate over no cases is null."""
    train_tiny(tmp_path / "out", preset=quick, log=lambda line: None)
    report = json.loads((tmp_path / "out" / REPORT).read_text(), parse_constant=_not_json)
    assert report["mtp_accept_teacher_forced"] is None  # the case this test is about: nothing to count


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_a_run_stopped_while_writing_leaves_the_folder_as_it_was(tmp_path: Path, quick: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped (a crash, Ctrl-C) after the new shards and config.json are written but before the rest: the folder
    must still be the old checkpoint, not new weights beside the old tokenizer, and no partial folder is left."""
    shipped, out = default_model_path(), tmp_path / "tiny-dsa"
    shutil.copytree(shipped, out)
    stop_writing_at(monkeypatch, "generation_config.json")
    with pytest.raises(WriteStopped):
        train_tiny(out, preset=quick, log=lambda line: None)
    for file in sorted(shipped.iterdir()):
        assert (out / file.name).read_bytes() == file.read_bytes(), f"{file.name} was changed by the stopped run"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_finished_run_replaces_the_whole_folder(tmp_path: Path, quick: str) -> None:
    """An old checkpoint's files the new one does not write (a special_tokens_map.json, which transformers' tokenizer
    reads) go with it; the folder keeps its mode; nothing is left beside it."""
    out = tmp_path / "tiny-dsa"
    shutil.copytree(default_model_path(), out)
    (out / "special_tokens_map.json").write_text("{}")
    out.chmod(0o750)
    train_tiny(out, preset=quick, log=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in default_model_path().iterdir())
    assert json.loads((out / "config.json").read_text()) == PRESETS[quick].config
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_new_folder_follows_the_umask(tmp_path: Path, quick: str) -> None:
    """The new folder is written under another name, then renamed: it must not keep a temporary folder's 0700."""
    (tmp_path / "plain").mkdir()
    train_tiny(tmp_path / "out", preset=quick, log=lambda line: None)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_folder_holding_other_files_is_refused_before_training(tmp_path: Path) -> None:
    """The folder is replaced as a whole: one holding anything but checkpoint files (a README, a home folder given
    by mistake) is refused, before half an hour of training, and left as it was."""
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="README.md, not checkpoint files"):
        train_tiny(tmp_path, preset="test", log=_stop_at_first_line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json"]


def test_a_folder_that_is_no_train_tiny_output_is_refused_before_training(tmp_path: Path) -> None:
    """JSON files of one's own (or a downloaded checkpoint) pass the file-name check, but the folder is deleted as a
    whole: without train-tiny's report it is refused, and left as it was."""
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a train-tiny output"):
        train_tiny(tmp_path, preset="test", log=_stop_at_first_line)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.json"]


def test_the_working_folder_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train-tiny .` would replace the folder the shell is in, leaving it in a deleted one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run train-tiny from outside"):
        train_tiny(".", preset="test", log=_stop_at_first_line)
