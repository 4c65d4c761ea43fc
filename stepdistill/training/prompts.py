"""Where training prompts come from: a list, a .txt file (one per line) or a .jsonl file; sampled with the batch's own
``torch.Generator`` so a batch depends only on where it is in the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


class PromptSource:
    """A fixed list of prompts sampled uniformly with replacement."""

    def __init__(self, prompts: Sequence[str], name: str = "prompts") -> None:
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{name}: no prompts")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"{name}: prompts must be strings, got {bad[0]!r}")
        self.prompts = prompts
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

    @classmethod
    def from_spec(cls, source: str | Path) -> "PromptSource":
        """A ``.txt`` file (one prompt per non-empty line) or a ``.jsonl`` file (one ``{"prompt": ...}`` object per
        line). Named sources (``"toy"``: every prompt of the toy world) are resolved by ``distill``
        (:func:`stepdistill.workflows.single_run.load_prompts`)."""
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found (expected 'toy', a .txt or a .jsonl file)")
        suffix = path.suffix.lower()
        text = path.read_text(encoding="utf-8")
        if suffix == ".txt":
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
        elif suffix == ".jsonl":
            prompts = []
            for no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{no}: not valid JSON ({e})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f'{path}:{no}: expected an object with a string "prompt" field, got {line.strip()[:80]!r}')
                prompts.append(obj["prompt"])
        else:
            raise ValueError(f"prompt file {path}: expected a .txt or .jsonl file, got {suffix!r}")
        return cls(prompts, name=str(path))


def as_prompt_sampler(source: Any) -> Callable[[int, torch.Generator], list[str]]:
    if isinstance(source, PromptSource):
        return source.sample
    if isinstance(source, (str, Path)):
        return PromptSource.from_spec(source).sample
    if hasattr(source, "sample") and callable(source.sample):
        return source.sample
    if callable(source):
        return source
    if isinstance(source, Sequence):
        return PromptSource(source).sample
    raise TypeError(f"prompt_source must be a PromptSource, a spec string, a list of prompts or a callable, got {type(source).__name__}")
