"""train-tiny's output folder is replaced as a whole, once the run is done.

The new checkpoint is written into a hidden sibling folder, which then takes the old one's place by rename:
a crash or Ctrl-C while writing leaves the old folder as it was (and the sibling is removed), and a reader
sees the old checkpoint or the new one, never new weights beside an old tokenizer. For the instant between
the two renames the folder is absent: a loader then fails, it cannot load a mix.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # config, tokenizer, index, report; shards
REPORT = "training_report.json"  # every train-tiny output has it (the shipped folder too)


def check_replaceable(out: Path) -> None:
    """ValueError unless the folder `out` (a resolved path) may be replaced: it holds only a checkpoint's files (it
    is deleted with them: a README beside them, or a home folder given by mistake, must not be), is not the working
    folder or above it, and its parent is writable (the new folder is made there). Checked before training too, so
    a bad folder costs seconds, not half an hour."""
    entries = list(out.iterdir())
    others = sorted(e.name for e in entries if not (e.is_file() and e.name.endswith(CHECKPOINT_SUFFIXES)))
    if others:
        raise ValueError(f"{out} holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}, not "
                         f"checkpoint files: train-tiny replaces the whole folder; move them or choose another")
    if entries and not (out / REPORT).is_file():  # JSON files of one's own, or a downloaded checkpoint, stay
        raise ValueError(f"{out} is not a train-tiny output (no {REPORT}): train-tiny replaces the whole folder; "
                         f"give an empty or new folder, or a train-tiny output")
    if out == Path.cwd() or out in Path.cwd().parents:  # the shell would be left in the old, deleted folder
        raise ValueError(f"run train-tiny from outside {out}: it replaces that folder")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {out.parent}: train-tiny writes the new {out.name} there, then renames it")


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A new empty folder to write the checkpoint into; on a clean exit it replaces the existing folder `out`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.train-tiny-", dir=out.parent))
    try:
        shutil.copymode(out, staging)  # mkdtemp's 0700 would hide the model from other users: `out`'s mode instead
        yield staging
        check_replaceable(out)  # again: files may have come during the run
        old = staging.with_name(staging.name + ".old")
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old)
