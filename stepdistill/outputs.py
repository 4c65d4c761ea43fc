"""Folders a command writes whole (an exported student, a merged student): checked before any work, replaced only
when the new one is complete.

A command that writes a folder at ``--out`` may replace only what it would itself have written there: nothing, an
empty folder, or a folder marked as one of ours (``stepdistill_export.json`` for students). Anything else — a run
folder with checkpoints, a folder of the user's files, a file — is refused with one line unless the user says
``--overwrite``; a folder that holds one of the command's own inputs (the run being exported, the students being
merged) is refused even then.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

__all__ = ["OutputFolderError", "STUDENT_MARKER", "check_output_folder", "replace_folder"]

#: the file every exported student folder holds (written by the exporters)
STUDENT_MARKER = "stepdistill_export.json"


class OutputFolderError(ValueError):
    """``--out`` holds something the command must not delete; the message says what and what to do."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False, marker: str = STUDENT_MARKER,
                        what: str = "an exported student folder", protect: Iterable[str | os.PathLike] = ()) -> Path:
    """``out`` resolved, after checking that writing there deletes nothing it should not (see the module docstring).
    ``protect``: the command's inputs; ``out`` may be neither one of them nor a folder that contains one."""
    out = Path(out).expanduser().resolve()
    for item in protect:
        item = Path(item).expanduser().resolve()
        if _inside(item, out):
            raise OutputFolderError(f"--out {out} {'is' if item == out else 'contains'} {item}, an input of this "
                                    "command, which writing there would delete; choose another --out")
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_dir() and not out.is_symlink():
        if (out / marker).is_file() or not any(out.iterdir()):
            return out
        if overwrite:
            return out
        shown = sorted(p.name for p in out.iterdir())
        listing = ", ".join(shown[:4]) + (", …" if len(shown) > 4 else "")
        raise OutputFolderError(f"--out {out} already holds files that are not {what} ({listing}); choose another "
                                "--out, or pass --overwrite to delete them")
    if overwrite:
        return out
    raise OutputFolderError(f"--out {out} is a file, not a folder; choose another --out, or pass --overwrite to "
                            "replace it")


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` onto ``out``, removing what was there only once the move succeeded (on
    failure the old content is put back)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".old_{out.name}_{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
