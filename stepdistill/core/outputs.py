"""Folders a command writes whole (an exported student, a merged student): checked before any work, replaced only
when the new one is complete.

A command that writes a folder at ``--out`` may replace only what it would itself have written there: nothing, an
empty folder, or a folder marked as one of ours (``stepdistill_export.json`` for students). Anything else — a run
folder with checkpoints, a folder of the user's files, a file — is refused with one line unless the user says
``--overwrite``; a folder that holds one of the command's own inputs (the run being exported, the students being
merged) is refused even then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["DiskFullError", "OutputFolderError", "STUDENT_MARKER", "check_output_folder", "disk_full",
           "replace_folder", "staged_folder"]

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


class DiskFullError(OSError):
    """A write failed because the disk is full; the message names the path, and the partial file is gone."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


#: what torch's checkpoint writer raises on a short write (no errno survives into its RuntimeError)
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
_LOW_SPACE = 256 * 2**20


def disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``err``, raised while writing under ``path``, means the disk is full: ENOSPC (or EDQUOT), "No space
    left on device", or torch's short-write error while less than 256 MiB is free there."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(err)
    if "No space left on device" in text:
        return True
    if any(marker in text for marker in _SHORT_WRITE):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free < _LOW_SPACE
        except OSError:
            return False
    return False


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, what: str = "the student") -> Iterator[Path]:
    """A temporary folder beside ``out`` to build ``what`` in; when the block succeeds it replaces ``out``
    (:func:`replace_folder`). On failure it is removed, and a full disk is reported as :class:`DiskFullError`
    naming the folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{out.name}_{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        replace_folder(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and disk_full(err, out.parent):
            raise DiskFullError(f"no space left on {out.parent} while writing {what} to {out}; the partial folder "
                                "was removed") from None
        raise


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path (best effort: some file systems refuse folders)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """The one way a file is written in this package: a temporary path beside ``path`` to write to; when the block
    succeeds it is fsynced, made readable (0644) and renamed onto ``path`` (then the folder is fsynced); on failure
    it is removed, and a full disk is reported as :class:`DiskFullError` naming the file. Folders are written the
    same way by :func:`staged_folder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}_{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and disk_full(err, path.parent):
            raise DiskFullError(f"no space left on {path.parent} while writing {path}; the partial file was "
                                "removed") from None
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) written to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
