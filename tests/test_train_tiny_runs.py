"""`dsaserve train-tiny` as a command: what a long run shows while it runs, what a stopped run leaves, and who
can read what it writes.

Each test stops the toy-scale preset (`--preset test`) at its first line of output, so it takes seconds.
"""
from __future__ import annotations

import io
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from dsaserve.cli import main
from dsaserve.model.checkpoint import default_model_path
from dsaserve.tiny import _save_sharded
from dsaserve.train_tiny import train_tiny


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
