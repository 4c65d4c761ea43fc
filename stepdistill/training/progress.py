"""What a run reports while it trains: the CSV log of every logged step, the hyper-parameters for TensorBoard, the
two-phase ETA, peak memory and the training state's bytes."""

from __future__ import annotations

import csv
import io
import json
import resource
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from stepdistill.core.outputs import write_text_atomic
from stepdistill.training.config import RunConfig


class CSVLogger:
    """``metrics.csv`` with a header that grows when new keys appear (the file is then rewritten atomically)."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        if keep_until_step is not None and self.path.is_file():  # resuming: keep the rows up to the checkpoint
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or ["step"])
                for row in reader:
                    try:
                        if int(float(row.get("step") or 0)) <= keep_until_step:
                            self.rows.append(row)
                    except ValueError:
                        continue
        self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())

    def log(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields.extend(new)
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="", extrasaction="ignore").writerow(row)


def tensorboard_hparams(config: RunConfig) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    out = {}
    for k, v in config.flat().items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process max RSS (getrusage)"


def training_state_bytes(modules: Sequence[torch.nn.Module], optimizers: Sequence[Any]) -> dict[str, int]:
    """Bytes of what training keeps resident besides activations: every *distinct* parameter tensor of ``modules``
    (a UNet shared by the teacher and a LoRA student counts once), their gradients, and the optimizers' state
    tensors (AdamW's two moments)."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    weights = sum(p.numel() * p.element_size() for p in seen.values())
    grads = sum(p.numel() * p.element_size() for p in seen.values() if p.requires_grad)
    states = 0
    for opt in optimizers:
        for state in getattr(opt, "state", {}).values():
            states += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    return {"weights": weights, "gradients": grads, "optimizer_state": states, "total": weights + grads + states}


class PhaseETA:
    """Time left for a run whose first ``warmup`` updates (an ODE-pair warm-up) cost less than the rest: the measured
    mean time per update of each phase; before the second phase has run, its time per update is the warm-up's times
    ``cost_ratio`` (the objective's estimate, ``phase_cost_ratio``), and the text says so with a "≈"."""

    def __init__(self, start: int, total: int, warmup: int, cost_ratio: float | None) -> None:
        self.total, self.warmup = int(total), int(warmup)
        self.cost_ratio = cost_ratio
        self.sums = [0.0, 0.0]
        self.counts = [0, 0]
        self._skip = [start < warmup, True]  # the first update of a phase includes one-off costs; not measured

    def record(self, step: int, seconds: float) -> None:
        phase = 0 if step < self.warmup else 1
        if self._skip[phase]:
            self._skip[phase] = False
            return
        self.sums[phase] += seconds
        self.counts[phase] += 1

    def seconds_left(self, done: int) -> tuple[float | None, bool]:
        """(seconds, estimated) for the updates after ``done``; None before anything was measured."""
        mean = [self.sums[i] / self.counts[i] if self.counts[i] else None for i in (0, 1)]
        left_w = max(self.warmup - done, 0)
        left_d = self.total - max(done, self.warmup)
        estimated = False
        if left_d > 0 and mean[1] is None:
            if mean[0] is None or (self.warmup > 0 and self.cost_ratio is None):
                return None, True
            mean[1] = mean[0] * (self.cost_ratio if self.warmup > 0 else 1.0)
            estimated = True
        if left_w > 0 and mean[0] is None:
            return None, True
        return left_w * (mean[0] or 0.0) + left_d * (mean[1] or 0.0), estimated

    def text(self, done: int) -> str:
        secs, estimated = self.seconds_left(done)
        if secs is None:
            return "?"
        h, rem = divmod(int(round(secs)), 3600)
        m, sec = divmod(rem, 60)
        clock = f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"
        return ("≈" if estimated else "") + clock
