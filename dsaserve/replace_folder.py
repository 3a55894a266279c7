"""A command's output folder (train-tiny's, make-tiny-model's) is replaced as a whole, once the new one is written.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # config, tokenizer, index, report; shards


@dataclass(frozen=True)
class Writer:
    """A command that replaces its output folder, and how it tells a folder it wrote (which it may delete with
    its files) from one it did not (a downloaded checkpoint, JSON files of one's own)."""
    command: str  # as messages name it: "train-tiny"
    not_its_output: Callable[[list[str]], str | None]  # the folder's file names -> why it is not, or None


def check_replaceable(out: Path, writer: Writer) -> None:
    """ValueError unless the folder `out` (a resolved path) may be replaced: it is empty or holds only a
    checkpoint's files written by `writer` (it is deleted with them: a README beside them, or a home folder given
    by mistake, must not be), is not the working folder or above it, and its parent is writable (the new folder is
    made there). Checked before the work too, so a bad folder costs seconds, not half an hour of training."""
    cmd, entries = writer.command, list(out.iterdir())
    others = sorted(e.name for e in entries if not (e.is_file() and e.name.endswith(CHECKPOINT_SUFFIXES)))
    if others:
        raise ValueError(f"{out} holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}, not "
                         f"checkpoint files: {cmd} replaces the whole folder; move them or choose another")
    why = writer.not_its_output([e.name for e in entries]) if entries else None
    if why:
        raise ValueError(f"{out} is not a {cmd} output ({why}): {cmd} replaces the whole folder; "
                         f"give an empty or new folder, or a {cmd} output")
    if out == Path.cwd() or out in Path.cwd().parents:  # the shell would be left in the old, deleted folder
        raise ValueError(f"run {cmd} from outside {out}: it replaces that folder")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {out.parent}: {cmd} writes the new {out.name} there, then renames it")


@contextmanager
def replacing(out: Path, writer: Writer) -> Iterator[Path]:
    """A new empty folder to write the checkpoint into; on a clean exit it replaces the existing folder `out`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{writer.command}-", dir=out.parent))
    try:
        shutil.copymode(out, staging)  # mkdtemp's 0700 would hide the model from other users: `out`'s mode instead
        yield staging
        check_replaceable(out, writer)  # again: files may have come while it was written
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
