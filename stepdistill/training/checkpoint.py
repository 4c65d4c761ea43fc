"""Crash-safe checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout under ``<out_dir>/checkpoints/``::

    step_000300/            a complete checkpoint (accelerate state + trainable_state.pt + stepdistill_checkpoint.json)
    step_000400/
    latest                  a text file naming the newest complete checkpoint ("step_000400")
    .tmp_step_000500/       only while a checkpoint is being written (or after a crash during the write)

A checkpoint is written into ``.tmp_step_XXXXXX`` by every process, then the main process writes the marker file
``stepdistill_checkpoint.json``, fsyncs, renames the folder to ``step_XXXXXX`` and atomically replaces ``latest``.
A folder without the marker, or a ``.tmp_`` folder, is never resumed from. Only the last ``keep`` checkpoints are kept.

Model weights: the trainer prepares one module (the objective's auxiliary networks plus the generator). Saving it
whole would copy every frozen weight (the LoRA base UNet, frozen teacher copies) into each checkpoint, so the
:class:`TrainableStateHooks` save only its trainable parameters and its buffers (``trainable_state.pt``) and restore
them on load; frozen weights are rebuilt from the teacher when the run is reconstructed. Under FSDP the hooks step
aside: accelerate writes each sharded network and optimizer as a torch.distributed.checkpoint folder
(``pytorch_model_fsdp_<i>/``, ``optimizer_<i>/``), frozen weights of those networks included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from stepdistill.core.errors import InputError
from stepdistill.core.outputs import (
    DiskFullError,
    disk_full,
    fsync_path,
    write_text_atomic,
)

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
LATEST_FILE = "latest"
MARKER_FILE = "stepdistill_checkpoint.json"
TRAINABLE_STATE_FILE = "trainable_state.pt"
_NAME_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be found, read or matched to the current run."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(step):06d}"


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and _NAME_RE.match(path.name) is not None and (path / MARKER_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _NAME_RE.match(child.name)
        if m and is_complete(child):
            out.append((int(m.group(1)), child))
    return sorted(out)


def read_marker(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER_FILE
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a complete stepdistill checkpoint (cannot read {MARKER_FILE}: {e})") from e


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``root/latest`` when that is complete, else the complete one with the highest step,
    else None. Interrupted writes (``.tmp_*`` folders, folders without the marker) are ignored."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _NAME_RE.match(name) and is_complete(root / name):
            return root / name
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder from ``path``: the folder itself, or the latest one inside a checkpoints folder
    or a run folder (``<run>/checkpoints``)."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint at {path}: expected a step_XXXXXX folder containing {MARKER_FILE} (written by "
        "stepdistill's Trainer), or a run / checkpoints folder holding such folders"
    )


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint at ``path`` looks loadable, else what is wrong with it: a missing marker, a file the
    marker lists that is missing or has another size (a truncated write), or — for checkpoints written before file
    sizes were recorded — a ``trainable_state.pt`` that ``torch.load`` cannot read."""
    path = Path(path)
    try:
        info = read_marker(path)
    except CheckpointError as e:
        return str(e)
    files = info.get("files")
    if isinstance(files, dict):
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != int(size):
                return f"{rel} has {f.stat().st_size} of its {int(size)} bytes (truncated or damaged)"
        return None
    state = path / TRAINABLE_STATE_FILE
    if state.is_file():
        try:
            torch.load(state, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file cannot be resumed from
            return f"{TRAINABLE_STATE_FILE} cannot be read ({type(e).__name__})"
    return None


def find_loadable_checkpoint(ckpt_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``ckpt_dir`` that :func:`verify_checkpoint` accepts (the ``latest``
    pointer first), and the newer ones it skipped with their problems."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    pointed = latest_checkpoint(ckpt_dir)
    if pointed is not None and pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    skipped = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def find_resume_checkpoint(ckpt_dir: str | Path, resume: str | Path) -> Path | None:
    """The checkpoint a run whose checkpoints live in ``ckpt_dir`` resumes from: ``"latest"`` -> the newest complete
    *loadable* one there (a damaged newer one is skipped with a warning; None when there is none); a bare name such as
    ``"step_000600"`` -> that checkpoint of this run; any other path -> :func:`resolve_checkpoint` (a checkpoint,
    checkpoints or run folder). A named checkpoint that does not exist or is damaged is a :class:`CheckpointError`."""
    import logging

    ckpt_dir = Path(ckpt_dir)
    if str(resume) == "latest":
        path, skipped = find_loadable_checkpoint(ckpt_dir)
        for bad, problem in skipped:
            logging.getLogger(__name__).warning("checkpoint %s is damaged (%s); %s", bad.name, problem,
                                                f"using {path.name} instead" if path else "no other checkpoint")
        return path
    named = ckpt_dir / str(resume)
    if not Path(resume).exists() and not named.exists():
        found = ", ".join(p.name for _, p in list_checkpoints(ckpt_dir)) or "none"
        raise CheckpointError(f"checkpoint {str(resume)!r} not found under {ckpt_dir} (checkpoints there: {found}); "
                              "pass 'latest', one of those names, or a checkpoint folder")
    path = resolve_checkpoint(named if not Path(resume).exists() and named.is_dir() else resume)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; resume from another one (--resume latest "
                              "picks the newest loadable checkpoint)")
    return path


def prune_checkpoints(root: str | Path, keep: int, protect: str | Collection[str] | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (never those named in ``protect``), and stale ``.tmp_``
    folders."""
    root = Path(root)
    removed = []
    kept = {protect} if isinstance(protect, str) else set(protect or ())
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep)]:
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for child in root.iterdir() if root.is_dir() else []:
        if child.is_dir() and child.name.startswith(TMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def save_checkpoint(accelerator, root: str | Path, step: int, keep: int, metadata: Mapping[str, Any] | None = None,
                    protect: Collection[str] = ()) -> Path:
    """Write ``accelerator.save_state`` atomically as ``root/step_XXXXXX`` (see the module docstring). Must be called
    on every process; returns the final path. Pruning to ``keep`` spares the checkpoints named in ``protect``."""
    root = Path(root)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint filling the disk
        if disk_full(err, root):
            raise DiskFullError(f"no space left on {root} while writing checkpoint {name}; the partial checkpoint was "
                                "removed. Free some space (or lower train.keep_checkpoints) and resume with --resume "
                                "latest") from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"step": int(step), "time": time.time(), "num_processes": accelerator.num_processes}
        info.update(dict(metadata or {}))
        # every file's size, so that a truncated file is found before a resume loads anything (verify_checkpoint)
        info["files"] = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        _fsync_tree(tmp)
        trash = None
        if final.exists():  # e.g. a resumed run reaching a step it had already saved
            trash = root / f"{TMP_PREFIX}old_{name}_{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(tmp, final)
        fsync_path(root)
        write_text_atomic(root / LATEST_FILE, name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        prune_checkpoints(root, keep, protect={name, *protect})
    accelerator.wait_for_everyone()
    return final


# --- state objects ------------------------------------------------------------------------------------------------
class TrainState:
    """The step counter (number of completed generator updates), the training FLOPs counted so far, the wall seconds
    the updates took (over every resumed part of the run) and the budget marks reached (``{"0.25": {"fraction",
    "step", "flops", "seconds", "checkpoint"}}``), checkpointed as an accelerate custom object. Checkpoints written
    before the FLOP count existed load with 0 FLOPs, 0 seconds and no marks."""

    def __init__(self, step: int = 0, flops: int = 0) -> None:
        self.step = int(step)
        self.flops = int(flops)
        self.seconds = 0.0
        self.marks: dict[str, dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "flops": self.flops, "seconds": self.seconds,
                "marks": {k: dict(v) for k, v in self.marks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.flops = int(state.get("flops", 0))
        self.seconds = float(state.get("seconds", 0.0))
        self.marks = {str(k): dict(v) for k, v in dict(state.get("marks") or {}).items()}


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without its frozen (``requires_grad=False``) parameters."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v.detach() for k, v in module.state_dict().items() if k not in frozen}


class TrainableStateHooks:
    """accelerate save/load pre-hooks that checkpoint only the trainable part of ``module`` (see module docstring).
    Under FSDP / DeepSpeed they step aside and accelerate saves the model its own way."""

    def __init__(self, accelerator, module: torch.nn.Module) -> None:
        self.accelerator = accelerator
        self.module = module
        self._handles = [
            accelerator.register_save_state_pre_hook(self.save_hook),
            accelerator.register_load_state_pre_hook(self.load_hook),
        ]

    def _active(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type not in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
            DistributedType.MEGATRON_LM,
        )

    def _index(self, models) -> int | None:
        for i, m in enumerate(models):
            if self.accelerator.unwrap_model(m) is self.module:
                return i
        return None

    def save_hook(self, models, weights, output_dir) -> None:
        if not self._active():
            return
        i = self._index(models)
        if i is None:
            return
        if self.accelerator.is_main_process:
            state = {k: v.to("cpu") for k, v in trainable_state_dict(self.module).items()}
            torch.save(state, Path(output_dir) / TRAINABLE_STATE_FILE)
        if i < len(weights):
            weights.pop(i)  # accelerate would otherwise write the whole module, frozen weights included

    def load_hook(self, models, input_dir) -> None:
        if not self._active():
            return
        i = self._index(models)
        if i is None:
            return
        path = Path(input_dir) / TRAINABLE_STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"cannot resume from {input_dir}: {TRAINABLE_STATE_FILE} is missing")
        state = torch.load(path, map_location="cpu", weights_only=True)
        frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in frozen]
        if missing or unexpected:
            raise CheckpointError(
                f"cannot resume from {input_dir}: the checkpoint does not match this generator/objective "
                f"(missing: {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected: {list(unexpected)[:5]}{'…' if len(unexpected) > 5 else ''}). "
                "Resume with the same recipe (objective, LoRA rank, timesteps) that wrote it."
            )
        models.pop(i)  # loaded here; accelerate must not look for its own model file
