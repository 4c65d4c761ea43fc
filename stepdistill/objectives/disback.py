"""DisBack — distribution backtracking (Zhang et al., ICLR 2025, arXiv:2408.15991; repo SYZhang0805/DisBack), an
option (``disback: true``) of the score-distillation objectives dmd, dmd2, vsd and sid.

Stage 1, degradation recording (:func:`stepdistill.training.stages.record_degradation_path`, attached by
``distill``): an auxiliary score ψ initialised from the teacher is fine-tuned by denoising score matching,
``mean‖ψ(x_t, t, c) − target(x₀, ε, t)‖²`` with x₀ = G₀(z, c) the *frozen initial student* and t ~ U{0 … T−1},
for ``disback_record_updates`` updates; its weights after every ``updates/N``-th update are saved:
path = [teacher = ψ₀, ψ₁, …, ψ_N ≈ the score of G₀].
Stage 2, backtracking: ordinary score distillation whose *real* score is path[i] instead of the teacher (with the
same CFG), with i = N − 1 for the first ``disback_interval`` updates, then N − 2, …, down to 0 (the teacher) and the
teacher from then on; the fake score starts from ψ_N, the checkpoint nearest G₀.

Stage 1 runs when distillation proper starts (update 0, or after an ODE-pair warm-up, so G₀ is the student that
score distillation starts from); the path lives in the run folder (``disback/node_XX.safetensors`` +
``disback/path.json``, written atomically; ``distill --overwrite`` removes it with the rest of the run) and a resumed
run reads it instead of recording again. The manifest records what the path was recorded with — the recording
settings and the run's fingerprint (:func:`path_settings`) — and is checked before reuse: at the start of stage 2 a
path recorded with other settings or by another run configuration is recorded again (and said so); later, a path
recorded with other settings is an error (the student has been trained against it), one recorded by another run
configuration with the same settings (``--allow-config-change``) is used with a warning. An incomplete path is
recorded again from the start. The target is a function of the update number, so a run resumed mid-path picks the
same target.

Differences from the released code, following the paper (docs/methods/disback.md): the switch loads the
recorded ψ_i into a separate real-score network (the released ``load_state_dict(..., strict=False)`` of a full
guidance state into the teacher matches no key and loads nothing, and its guard allows about one switch); switches
are every ``disback_interval`` updates (the released schedule is also a fixed interval, 1,000 iterations); ψ is
trained without the released code's extra GAN-classifier term; recording uses AdamW at ``disback_record_lr``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from stepdistill.core.outputs import atomic_file
from stepdistill.models.generators import copy_unet
from stepdistill.objectives.base import (
    ObjectiveConfigError,
    Requirements,
    check_bool,
    check_int,
    check_number,
)

PATH_DIR = "disback"
MANIFEST = "path.json"


def node_file(directory: Path, j: int) -> Path:
    return directory / f"node_{j:02d}.safetensors"


def save_node(state: dict[str, torch.Tensor], path: Path) -> None:
    """One path node's weights, written atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp))


def path_settings(cfg: dict[str, Any], batch_size: int, seed: int, run_fingerprint: str | None) -> dict[str, Any]:
    """What a recorded path depends on besides the initial student: the recording settings, and the run's
    fingerprint, which stands for the initial student G₀ (teacher, seed, warm-up)."""
    return {"nodes": int(cfg["disback_nodes"]), "record_updates": int(cfg["disback_record_updates"]),
            "lr": float(cfg["disback_record_lr"]), "batch_size": int(batch_size), "seed": int(seed),
            "run": run_fingerprint}


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The path's manifest when the whole path was recorded (every node file present), else None."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not manifest.get("complete") or not all(node_file(directory, j).is_file() for j in range(1, manifest["nodes"] + 1)):
        return None
    return manifest


def target_index(step: int, start: int, nodes: int, interval: int) -> int:
    """The path node that is the real score at generator update ``step``: N − 1 − ⌊(step − start)/interval⌋, at
    least 0 (the teacher); ``nodes`` (= ψ_N, never a target) before ``start``."""
    if step < start:
        return nodes
    return max(nodes - 1 - (step - start) // interval, 0)


class DisBackOption:
    """Mixin for score-distillation objectives (before the objective's other bases): the ``disback*`` config keys,
    the stage-1 trigger in :meth:`set_train_step` and the moving real score :meth:`real_score_unet`."""

    DISBACK_DEFAULTS = {"disback": False, "disback_nodes": 4, "disback_record_updates": 200,
                        "disback_record_lr": 1e-4, "disback_interval": 25}

    @classmethod
    def validate_disback_config(cls, cfg) -> None:
        check_bool(cls.name, "disback", cfg["disback"])
        check_int(cls.name, "disback_nodes", cfg["disback_nodes"], low=1)
        check_int(cls.name, "disback_record_updates", cfg["disback_record_updates"], low=1)
        check_number(cls.name, "disback_record_lr", cfg["disback_record_lr"], low=0.0)
        check_int(cls.name, "disback_interval", cfg["disback_interval"], low=1)
        if cfg["disback_record_updates"] < cfg["disback_nodes"]:
            raise ObjectiveConfigError(cls.name, "disback_record_updates", "must be at least disback_nodes")
        if cfg["disback"] and cfg.get("fake_lora_rank") is not None:
            raise ObjectiveConfigError(cls.name, "disback", "needs a full fake score (fake_lora_rank: null): the fake "
                                       "score starts from the recorded full-UNet checkpoint ψ_N")

    _disback_run: dict[str, Any] | None = None
    _disback_loaded: int | None = None
    _disback_unet: torch.nn.Module | None = None

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """With ``disback: true`` the objective records its degradation path into the run folder: ``distill``
        attaches the run (:meth:`attach_run`) before training."""
        return dataclasses.replace(super().requirements(cfg), uses_run_folder=bool(cfg["disback"]))

    def attach_run(self, run_dir: str | Path, sample_embeds: Callable[[int, torch.Generator], Any], batch_size: int,
                   seed: int = 0, run_fingerprint: str | None = None, log: Callable[[str], None] | None = None, *,
                   record_path: Callable[..., list[Path]]) -> None:
        """The run's context for stage 1 (``distill`` calls this before training): where the path is stored, how
        prompts are drawn, which run it belongs to (its fingerprint), and ``record_path``, the training stage that
        records it (:func:`stepdistill.training.stages.record_degradation_path`: the objective supplies the loss,
        the stage runs the optimizer loop and writes the files)."""
        self._disback_run = {"dir": Path(run_dir) / PATH_DIR, "sample_embeds": sample_embeds,
                             "batch_size": int(batch_size), "seed": int(seed), "fingerprint": run_fingerprint,
                             "log": log or logging.getLogger(__name__).warning, "record": record_path}

    def _path_settings(self) -> dict[str, Any]:
        run = self._disback_run
        return path_settings(self.config, run["batch_size"], run["seed"], run["fingerprint"])

    def _manifest_problem(self, manifest: dict[str, Any]) -> str | None:
        """What differs between the recorded path and this run (None: nothing); "run" alone when only the run's
        fingerprint does."""
        want = self._path_settings()
        recorded = {k: manifest.get(k) for k in want}
        changed = [k for k in want if k != "run" and recorded[k] != want[k]]
        if changed:
            return ", ".join(f"{k} {recorded[k]!r} -> {want[k]!r}" for k in changed)
        return "run" if recorded["run"] != want["run"] else None

    def disback_start(self) -> int:
        """The first update of score distillation proper (after an ODE-pair warm-up, if any)."""
        return int(self.config.get("ode_warmup_steps") or 0)

    def disback_target(self) -> int:
        cfg = self.config
        return target_index(self.train_step, self.disback_start(), cfg["disback_nodes"], cfg["disback_interval"])

    def _disback_dir(self) -> Path:
        if self._disback_run is None:
            raise RuntimeError(f"{self.name} with disback: true needs attach_run(run_dir, ...) before training "
                               "(stepdistill distill does it)")
        return self._disback_run["dir"]

    def ensure_disback_path(self) -> dict[str, Any]:
        """The recorded path's manifest, recording it first (stage 1) when the run folder has no complete one of
        this run's settings and configuration."""
        directory = self._disback_dir()
        manifest = read_manifest(directory)
        problem = None if manifest is None else self._manifest_problem(manifest)
        if manifest is None or problem is not None:
            cfg, run = self.config, self._disback_run
            if problem is not None:
                why = "another run configuration" if problem == "run" else f"other settings ({problem})"
                run["log"](f"disback: the path in {directory} was recorded by {why}; recording it again")
            run["record"](self, run["sample_embeds"], directory,
                                    cfg["disback_nodes"], cfg["disback_record_updates"], cfg["disback_record_lr"],
                                    run["batch_size"], run["seed"], run_fingerprint=run["fingerprint"])
            manifest = read_manifest(directory)
        return manifest

    def _load_node(self, j: int) -> torch.nn.Module:
        from safetensors.torch import load_file

        if self._disback_unet is None:
            net = copy_unet(self.teacher.unet, dtype=None, trainable=False)
            object.__setattr__(self, "_disback_unet", net)  # derived from disk: not part of the objective's state
        state = load_file(str(node_file(self._disback_dir(), j)))
        dtype = next(self.teacher.unet.parameters()).dtype
        self._disback_unet.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return self._disback_unet

    def set_train_step(self, step: int) -> None:
        super().set_train_step(step)
        cfg = self.config
        if not cfg["disback"] or step < self.disback_start():
            return
        j = self.disback_target()
        if step > self.disback_start() and self._disback_loaded is None:
            manifest = read_manifest(self._disback_dir())
            problem = "missing" if manifest is None else self._manifest_problem(manifest)
            if problem == "run":
                self._disback_run["log"](f"disback: the path in {self._disback_dir()} was recorded by another run "
                                         "configuration with the same recording settings; using it")
            elif problem is not None:
                what = ("no complete degradation path" if problem == "missing"
                        else f"a degradation path recorded with other settings ({problem})")
                raise RuntimeError(
                    f"disback: {what} in {self._disback_dir()}; it is recorded from the initial student at update "
                    f"{self.disback_start()} and cannot be recorded again at update {step}. Resume from a checkpoint at "
                    f"or before update {self.disback_start()}, or start the run again (--overwrite)")
        if step == self.disback_start():
            self.ensure_disback_path()
            from safetensors.torch import load_file

            state = load_file(str(node_file(self._disback_dir(), cfg["disback_nodes"])))
            with torch.no_grad():  # the fake score starts from ψ_N
                self.fake_unet.load_state_dict(state)
            self.request_auxiliary_reset()
        if j != self._disback_loaded:
            if j > 0:
                self._load_node(j)
            self._disback_loaded = j

    def real_score_unet(self) -> torch.nn.Module:
        if self.config["disback"] and self._disback_loaded not in (None, 0) and self._disback_loaded < self.config["disback_nodes"]:
            return self._disback_unet
        return self.teacher.unet
