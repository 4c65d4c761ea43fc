"""Benchmark suite files (``eval/*.yaml``): typed and validated before any work starts.

A suite says *how to judge*: which metrics, on which prompts, how many samples per prompt, with which seeds, and
which configurations (pipeline × steps × guidance [× scheduler]) to evaluate. :func:`load_suite` reads a YAML
file, :func:`suite_from_dict` validates an already parsed mapping (the ``stepdistill eval`` command builds one from
its flags, so both paths share one set of rules). Every problem is a :class:`SuiteError` (a ``ValueError``) that
names the file and the key as a dotted path (``entries[1].stepz``); an unknown key also lists the allowed ones.

Checked at load time, before anything is generated: key names, types, impossible values (steps ≤ 0, guidance < 0,
samples_per_prompt ≤ 0, ...), that every path exists (pipelines, prompt files, reference images, metric weights
given as paths), that prompt files are not empty, that the toy metrics get toy-world prompts, that a scheduler
name is a diffusers scheduler class, and that expanded configurations have distinct names.

Relative paths are resolved against the folder of the suite file; ``~`` and ``$VARIABLES`` are expanded first,
so a shipped suite can say ``${STEPDISTILL_COCO}/val2014``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stepdistill.core.yaml_io import YAMLFileError, load_yaml_file
from stepdistill.eval.hps import benchmark_prompts
from stepdistill.toy import world
from stepdistill.toy.assets import TOY_EVALUATOR, TOY_TEACHER
from stepdistill.training.prompts import PromptSource

__all__ = [
    "SuiteError",
    "Suite",
    "EntrySpec",
    "Configuration",
    "LatencySpec",
    "METRICS",
    "ROLES",
    "load_suite",
    "suite_from_dict",
    "read_prompt_file",
]

METRICS = ("toy", "fid", "clip", "hpsv2")
ROLES = ("teacher", "student")
SAMPLE_FORMATS = ("npz", "png")
DTYPES = ("float32", "float16", "bfloat16")
CLIP_BACKENDS = ("transformers", "open_clip")
HPS_VERSIONS = ("2.0", "2.1")
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")

TOP_KEYS = (
    "suite", "description", "metrics", "prompts", "max_prompts", "samples_per_prompt", "seed", "batch_size",
    "resolution", "dtype", "device", "sample_format", "latency", "grid_prompts", "grid_scale", "front",
    "toy_evaluator", "toy_reference_size",
    "inception", "reference_images", "reference_stats", "reference_limit", "fid_resize",
    "clip_model", "clip_backend", "clip_arch",
    "hps_checkpoint", "hps_version", "hps_prompts_dir",
    "entries",
)
ENTRY_KEYS = ("name", "role", "pipeline", "steps", "guidance", "scheduler", "negative_prompt")
LATENCY_KEYS = ("batch", "repeats", "warmup")


class SuiteError(ValueError):
    """An invalid suite: the message names the file, the key (dotted path) and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Typed suite
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencySpec:
    """Latency per configuration: ``warmup`` untimed calls, then the median of ``repeats`` timed calls, at batch 1
    and at ``batch`` (reported per image)."""

    batch: int = 64
    repeats: int = 5
    warmup: int = 2


@dataclass(frozen=True)
class EntrySpec:
    """One ``entries:`` item as written (steps and guidance may be lists; they expand to their product)."""

    name: str
    role: str
    pipeline: str  # "toy" or an absolute folder path
    steps: tuple[int, ...]
    guidance: tuple[float, ...]
    scheduler: str | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class Configuration:
    """One evaluated configuration: a pipeline at one step count and one guidance scale."""

    name: str
    role: str
    pipeline: str
    steps: int
    guidance: float
    scheduler: str | None = None
    negative_prompt: str | None = None
    index: int = 0  # position of its entry in ``entries``

    @property
    def slug(self) -> str:
        """File-system-safe identifier, unique within a suite: ``<name>-s<steps>-w<guidance>[-<scheduler>][-neg<hash>]``."""
        parts = [_slugify(self.name), f"s{self.steps}", f"w{self.guidance:g}"]
        if self.scheduler:
            parts.append(_slugify(self.scheduler))
        if self.negative_prompt is not None:
            parts.append("neg" + hashlib.sha1(self.negative_prompt.encode()).hexdigest()[:8])
        return "-".join(parts)

    @property
    def label(self) -> str:
        text = f"{self.name} {self.steps} step{'s' if self.steps != 1 else ''} w={self.guidance:g}"
        return text + (f" {self.scheduler}" if self.scheduler else "")


@dataclass
class Suite:
    """A validated suite. Paths are absolute; ``prompts`` is the prompt list itself (``prompt_source`` says where
    it came from) and ``prompt_styles`` the style of each prompt where the source has styles (HPSv2)."""

    name: str
    metrics: tuple[str, ...]
    prompt_source: str
    prompts: list[str]
    entries: list[EntrySpec]
    prompt_styles: list[str] | None = None
    description: str | None = None
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 64
    resolution: int | None = None
    dtype: str = "float32"
    device: str | None = None
    sample_format: str = "npz"
    latency: LatencySpec | None = field(default_factory=LatencySpec)
    grid_prompts: int = 8
    grid_scale: int | None = None
    front: bool = False  # the report plots the quality-diversity front (front.png): suites of a merge sweep
    toy_evaluator: str | None = None
    toy_reference_size: int = 10_000
    inception: str | None = None
    reference_images: str | None = None
    reference_stats: str | None = None
    reference_limit: int | None = None
    fid_resize: int | None = None
    clip_model: str | None = None
    clip_backend: str = "transformers"
    clip_arch: str = "ViT-g-14"
    hps_checkpoint: str | None = None
    hps_version: str = "2.1"
    hps_prompts_dir: str | None = None
    source: str = "<dict>"
    overrides: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.samples_per_prompt

    def configurations(self) -> list[Configuration]:
        """Every entry expanded over the product of its step counts and guidance scales, in file order."""
        out = []
        for index, e in enumerate(self.entries):
            for steps, guidance in itertools.product(e.steps, e.guidance):
                out.append(Configuration(e.name, e.role, e.pipeline, steps, guidance, e.scheduler, e.negative_prompt,
                                         index))
        return out

    def prompts_digest(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()

    def with_overrides(self, samples_per_prompt: int | None = None, max_prompts: int | None = None) -> "Suite":
        """A copy with fewer prompts / another sample count (recorded in ``overrides`` and in the report)."""
        import copy

        new = copy.copy(self)
        new.overrides = dict(self.overrides)
        if samples_per_prompt is not None:
            if samples_per_prompt <= 0:
                raise SuiteError(f"--samples-per-prompt must be positive, got {samples_per_prompt}")
            if "toy" in self.metrics and samples_per_prompt < 2:
                raise SuiteError("--samples-per-prompt: the toy metrics need at least 2 samples per prompt")
            new.samples_per_prompt = samples_per_prompt
            new.overrides["samples_per_prompt"] = samples_per_prompt
        if max_prompts is not None:
            if max_prompts <= 0:
                raise SuiteError(f"--max-prompts must be positive, got {max_prompts}")
            idx = _spread(len(self.prompts), max_prompts)
            new.prompts = [self.prompts[i] for i in idx]
            new.prompt_styles = [self.prompt_styles[i] for i in idx] if self.prompt_styles else None
            new.overrides["max_prompts"] = max_prompts
        return new


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite YAML file; :class:`SuiteError` naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist" if not path.exists() else f"suite path {path} is not a file")
    try:
        data = load_yaml_file(path)
    except YAMLFileError as err:
        raise SuiteError(str(err)) from None
    if data is None:
        raise SuiteError(f"{path}: the suite file is empty")
    return suite_from_dict(data, base_dir=path.resolve().parent, source=str(path))


def suite_from_dict(data: Any, base_dir: str | os.PathLike | None = None, source: str = "<dict>") -> Suite:
    """Validate a parsed suite mapping. Relative paths resolve against ``base_dir`` (default: the working folder)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    r = _Reader(source, base)
    if not isinstance(data, Mapping):
        raise SuiteError(f"{source}: a suite must be a mapping of keys to values, got {type(data).__name__}")
    r.check_keys(data, TOP_KEYS, "")

    name = r.string(data, "suite", required=True)
    description = r.string(data, "description")
    metrics = r.metrics(data)
    samples_per_prompt = r.integer(data, "samples_per_prompt", default=1, minimum=1)
    seed = r.integer(data, "seed", default=0, minimum=0)
    batch_size = r.integer(data, "batch_size", default=64, minimum=1)
    resolution = r.integer(data, "resolution", default=None, minimum=8)
    dtype = r.choice(data, "dtype", DTYPES, default="float32")
    device = r.string(data, "device")
    sample_format = r.choice(data, "sample_format", SAMPLE_FORMATS, default="npz")
    latency = r.latency(data)
    grid_prompts = r.integer(data, "grid_prompts", default=8, minimum=1)
    grid_scale = r.integer(data, "grid_scale", default=None, minimum=1)
    max_prompts = r.integer(data, "max_prompts", default=None, minimum=1)
    front = data.get("front", False)
    if not isinstance(front, bool):
        r.fail("front", f"must be true or false (plot the quality-diversity front of a merge sweep), got {front!r}")

    toy_evaluator = r.path(data, "toy_evaluator", kind="dir")
    toy_reference_size = r.integer(data, "toy_reference_size", default=10_000, minimum=2)
    inception = r.path(data, "inception", kind="any")
    reference_images = r.path(data, "reference_images", kind="dir")
    reference_stats = r.path(data, "reference_stats", kind="any", must_exist=reference_images is None)
    reference_limit = r.integer(data, "reference_limit", default=None, minimum=2)
    fid_resize = r.integer(data, "fid_resize", default=None, minimum=8)
    clip_backend = r.choice(data, "clip_backend", CLIP_BACKENDS, default="transformers")
    clip_model = r.path(data, "clip_model", kind="dir" if clip_backend == "transformers" else "file")
    clip_arch = r.string(data, "clip_arch") or "ViT-g-14"
    hps_checkpoint = r.path(data, "hps_checkpoint", kind="file")
    hps_version = r.choice(data, "hps_version", HPS_VERSIONS, default="2.1", coerce=str)
    hps_prompts_dir = r.path(data, "hps_prompts_dir", kind="dir")

    # metric requirements
    if "toy" in metrics:
        if samples_per_prompt < 2:
            r.fail("samples_per_prompt", "the toy metrics (diversity, coverage) need at least 2 samples per prompt")
        if toy_evaluator is None:
            if not TOY_EVALUATOR.is_dir():
                r.fail("toy_evaluator", f"the shipped toy evaluator is missing (expected a folder at {TOY_EVALUATOR}); "
                                        "recreate it with `stepdistill toy train-evaluator` or give toy_evaluator: PATH")
    if "fid" in metrics:
        if reference_images is None and reference_stats is None:
            r.fail("metrics", "the 'fid' metric needs reference_images: FOLDER (statistics are computed once and "
                              "cached) or reference_stats: FILE.npz")
    if "clip" in metrics and clip_model is None:
        r.fail("clip_model", "the 'clip' metric needs clip_model: a transformers CLIP folder (clip_backend: "
                             "transformers) or an open_clip checkpoint file (clip_backend: open_clip)")
    if "hpsv2" in metrics and hps_checkpoint is None and not os.environ.get("STEPDISTILL_HPS_CHECKPOINT"):
        r.fail("hps_checkpoint", "the 'hpsv2' metric needs hps_checkpoint: PATH (HPS_v2.1_compressed.pt or "
                                 "HPS_v2_compressed.pt) or the environment variable STEPDISTILL_HPS_CHECKPOINT")

    prompt_source, prompts, styles = r.prompts(data, hps_prompts_dir)
    if max_prompts is not None and max_prompts < len(prompts):
        idx = _spread(len(prompts), max_prompts)
        prompts = [prompts[i] for i in idx]
        styles = [styles[i] for i in idx] if styles else None
    if "toy" in metrics:
        for i, p in enumerate(prompts):
            try:
                world.parse_prompt(p)
            except ValueError as err:
                r.fail("prompts", f"the toy metrics need toy-world prompts; prompt {i + 1} of {prompt_source}: {err}")

    entries = r.entries(data)
    suite = Suite(
        name=name, metrics=metrics, prompt_source=prompt_source, prompts=prompts, prompt_styles=styles,
        entries=entries, description=description, samples_per_prompt=samples_per_prompt, seed=seed,
        batch_size=batch_size, resolution=resolution, dtype=dtype, device=device, sample_format=sample_format,
        latency=latency, grid_prompts=grid_prompts, grid_scale=grid_scale, front=front, toy_evaluator=toy_evaluator,
        toy_reference_size=toy_reference_size, inception=inception, reference_images=reference_images,
        reference_stats=reference_stats, reference_limit=reference_limit, fid_resize=fid_resize,
        clip_model=clip_model, clip_backend=clip_backend, clip_arch=clip_arch, hps_checkpoint=hps_checkpoint,
        hps_version=hps_version, hps_prompts_dir=hps_prompts_dir, source=source,
    )
    seen: dict[str, Configuration] = {}
    for c in suite.configurations():
        if c.slug in seen:
            r.fail(f"entries[{c.index}]", f"configuration '{c.label}' is evaluated twice (also by "
                                          f"entries[{seen[c.slug].index}]); give the entries different names")
        seen[c.slug] = c
    return suite


def read_prompt_file(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Prompts from a ``.txt`` (one per line; blank lines skipped), ``.jsonl`` (one JSON object per line with a
    ``"prompt"`` string and optionally a ``"style"``) or ``.json`` file (a list of strings, or of such objects).
    Returns ``(prompts, styles or None)``; raises :class:`SuiteError` naming the file when it is unreadable,
    malformed or holds no prompt.

    ``.txt`` and ``.jsonl`` files are read by the same reader as training prompts
    (:meth:`stepdistill.training.prompts.PromptSource.from_spec`); a suite adds only the optional ``"style"`` of
    a JSONL line (the HPSv2 styles) and the ``.json`` list form."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"prompt file {path} does not exist" if not path.exists() else f"prompt path {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise SuiteError(f"prompt file {path}: unknown format '{suffix}'; use .txt (one prompt per line), "
                         ".jsonl ({\"prompt\": ...} per line) or .json (a list of prompts)")
    if suffix == ".json":
        prompts, styles = _read_json_list(path)
    else:
        try:
            prompts = [p.strip() for p in PromptSource.from_spec(path).prompts]
        except ValueError as err:
            raise _prompt_file_error(path, err) from None
        styles = _jsonl_styles(path) if suffix == ".jsonl" else [None] * len(prompts)
        for k, prompt in enumerate(prompts, start=1):
            if not prompt:
                raise SuiteError(f"prompt file {path}, prompt {k}: empty prompt")
    if not prompts:
        raise SuiteError(f"prompt file {path} holds no prompts (it is empty or only blank lines)")
    has_styles = any(s is not None for s in styles)
    return prompts, ([s if s is not None else "unstyled" for s in styles] if has_styles else None)


def _prompt_file_error(path: Path, err: ValueError) -> SuiteError:
    """:meth:`PromptSource.from_spec`'s error (``<path>:<line>: ...`` or ``<path>: ...``) in a suite's words."""
    message = str(err)
    located = re.match(re.escape(str(path)) + r":(\d+): (.*)", message, flags=re.S)
    if located:
        return SuiteError(f"prompt file {path}, line {located.group(1)}: {located.group(2)}")
    return SuiteError(f"prompt file {path}: {message.removeprefix(f'{path}: ')}")


def _jsonl_styles(path: Path) -> list[str | None]:
    """The optional ``"style"`` of every prompt line of a ``.jsonl`` prompt file (already read, and its lines
    checked, by :meth:`PromptSource.from_spec`)."""
    styles: list[str | None] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            style = json.loads(line).get("style")
            if style is not None and not isinstance(style, str):
                raise SuiteError(f"prompt file {path}, line {lineno}: \"style\" must be a string")
            styles.append(style)
    return styles


def _read_json_list(path: Path) -> tuple[list[str], list[str | None]]:
    """A ``.json`` prompt file: a list of prompt strings or ``{"prompt", "style"}`` objects."""
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise SuiteError(f"prompt file {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(obj, list):
        raise SuiteError(f"prompt file {path}: expected a JSON list of prompts, got {type(obj).__name__}")
    prompts: list[str] = []
    styles: list[str | None] = []
    for k, item in enumerate(obj):
        prompt, style = _prompt_object(item, f"prompt file {path}, item {k}")
        prompts.append(prompt)
        styles.append(style)
    return prompts, styles


def _prompt_object(obj: Any, where: str) -> tuple[str, str | None]:
    if isinstance(obj, str):
        prompt, style = obj, None
    elif isinstance(obj, Mapping):
        prompt, style = obj.get("prompt"), obj.get("style")
        if not isinstance(prompt, str):
            raise SuiteError(f"{where}: expected an object with a \"prompt\" string, got keys {sorted(obj)}")
        if style is not None and not isinstance(style, str):
            raise SuiteError(f"{where}: \"style\" must be a string")
    else:
        raise SuiteError(f"{where}: expected a prompt string or an object with a \"prompt\" string")
    if not prompt.strip():
        raise SuiteError(f"{where}: empty prompt")
    return prompt.strip(), style


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _slugify(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_.")
    return slug or "entry"


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when k ≥ n)."""
    if k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Reader:
    """Typed access to suite keys; every failure names the source file and the dotted key."""

    def __init__(self, source: str, base: Path):
        self.source = source
        self.base = base

    def fail(self, key: str, message: str) -> None:
        raise SuiteError(f"{self.source}: {key}: {message}")

    def check_keys(self, mapping: Mapping, allowed: tuple[str, ...], prefix: str) -> None:
        for key in mapping:
            if not isinstance(key, str) or key not in allowed:
                dotted = f"{prefix}.{key}" if prefix else str(key)
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                where = f" in {prefix}" if prefix else ""
                raise SuiteError(
                    f"{self.source}: unknown key '{dotted}'{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                    f"allowed keys{where}: {', '.join(allowed)}"
                )

    @staticmethod
    def _dotted(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def string(self, m: Mapping, key: str, required: bool = False, prefix: str = "") -> str | None:
        value = m.get(key)
        if value is None:
            if required:
                self.fail(self._dotted(prefix, key), "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(self._dotted(prefix, key), f"expected a non-empty string, got {_type_name(value)} {value!r}")
        return value

    def integer(self, m: Mapping, key: str, default: int | None, minimum: int | None = None, prefix: str = "") -> int | None:
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(self._dotted(prefix, key), f"expected an integer, got {_type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            self.fail(self._dotted(prefix, key), f"must be at least {minimum}, got {value}")
        return int(value)

    def choice(self, m: Mapping, key: str, options: tuple[str, ...], default: str, coerce=None) -> str:
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if coerce is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = coerce(value)
        if value not in options:
            self.fail(key, f"expected one of {', '.join(options)}, got {value!r}")
        return value

    def path(self, m: Mapping, key: str, kind: str = "any", must_exist: bool = True, prefix: str = "") -> str | None:
        value = self.string(m, key, prefix=prefix)
        if value is None:
            return None
        return self.resolve(value, self._dotted(prefix, key), kind, must_exist)

    def resolve(self, value: str, key: str, kind: str = "any", must_exist: bool = True) -> str:
        expanded = os.path.expanduser(os.path.expandvars(value))
        unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", expanded)
        p = Path(expanded)
        if not p.is_absolute():
            p = self.base / p
        if must_exist:
            if not p.exists():
                why = f" (environment variable {', '.join(unset)} is not set)" if unset else ""
                self.fail(key, f"path {p} does not exist{why}")
            if kind == "dir" and not p.is_dir():
                self.fail(key, f"expected a folder, but {p} is a file")
            if kind == "file" and not p.is_file():
                self.fail(key, f"expected a file, but {p} is a folder")
        return str(p)

    def metrics(self, m: Mapping) -> tuple[str, ...]:
        value = m.get("metrics")
        if value is None:
            self.fail("metrics", f"is required: a list, a subset of {', '.join(METRICS)}")
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            self.fail("metrics", f"expected a non-empty list of metric names ({', '.join(METRICS)}), got {value!r}")
        for v in value:
            if v not in METRICS:
                hint = difflib.get_close_matches(v, METRICS, n=1)
                self.fail("metrics", f"unknown metric {v!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                     f"allowed: {', '.join(METRICS)}")
        if len(set(value)) != len(value):
            self.fail("metrics", f"a metric is listed twice: {value}")
        return tuple(value)

    def latency(self, m: Mapping) -> LatencySpec | None:
        if "latency" not in m:
            return LatencySpec()
        value = m["latency"]
        if value is None or value is False:
            return None  # latency not measured (latency_ms null in the report)
        if not isinstance(value, Mapping):
            self.fail("latency", f"expected a mapping {{batch, repeats, warmup}} or false, got {_type_name(value)}")
        self.check_keys(value, LATENCY_KEYS, "latency")
        return LatencySpec(
            batch=self.integer(value, "batch", default=64, minimum=1, prefix="latency"),
            repeats=self.integer(value, "repeats", default=5, minimum=1, prefix="latency"),
            warmup=self.integer(value, "warmup", default=2, minimum=0, prefix="latency"),
        )

    def prompts(self, m: Mapping, hps_prompts_dir: str | None) -> tuple[str, list[str], list[str] | None]:
        value = self.string(m, "prompts", required=True)
        if value == "toy":
            return "toy", world.all_prompts(), None
        if value == "hpsv2":
            by_style = benchmark_prompts(hps_prompts_dir)  # MetricUnavailable (with instructions) when absent
            prompts = [p for ps in by_style.values() for p in ps]
            styles = [s for s, ps in by_style.items() for _ in ps]
            return "hpsv2", prompts, styles
        path = self.resolve(value, "prompts", kind="file", must_exist=False)
        try:
            prompts, styles = read_prompt_file(path)
        except SuiteError as err:
            raise SuiteError(f"{self.source}: prompts: {err}") from None
        return path, prompts, styles

    def _number_list(self, value: Any, key: str, integer: bool) -> tuple:
        items = value if isinstance(value, list) else [value]
        if not items:
            self.fail(key, "expected a number or a non-empty list of numbers, got an empty list")
        out = []
        for k, item in enumerate(items):
            where = f"{key}[{k}]" if isinstance(value, list) else key
            if isinstance(item, bool) or not isinstance(item, (int, float)) or (integer and not isinstance(item, int)):
                self.fail(where, f"expected {'an integer' if integer else 'a number'}, got {_type_name(item)} {item!r}")
            if not math.isfinite(item):
                self.fail(where, f"expected a finite number, got {item!r}")
            out.append(int(item) if integer else float(item))
        return tuple(out)

    def entries(self, m: Mapping) -> list[EntrySpec]:
        value = m.get("entries")
        if not isinstance(value, list) or not value:
            self.fail("entries", f"expected a non-empty list of configurations, got {_type_name(value)}")
        out = []
        for i, e in enumerate(value):
            where = f"entries[{i}]"
            if not isinstance(e, Mapping):
                self.fail(where, f"expected a mapping with keys {', '.join(ENTRY_KEYS)}, got {_type_name(e)}")
            self.check_keys(e, ENTRY_KEYS, where)
            name = self.string(e, "name", required=True, prefix=where)
            role = e.get("role")
            if role not in ROLES:
                self.fail(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
            for key in ("steps", "guidance"):
                if key not in e:
                    self.fail(f"{where}.{key}", "is required")
            steps = self._number_list(e["steps"], f"{where}.steps", integer=True)
            for k, s in enumerate(steps):
                if s <= 0:
                    self.fail(f"{where}.steps" + (f"[{k}]" if isinstance(e["steps"], list) else ""),
                              f"must be a positive number of sampling steps, got {s}")
            guidance = self._number_list(e["guidance"], f"{where}.guidance", integer=False)
            for k, g in enumerate(guidance):
                if g < 0 or g != g:
                    self.fail(f"{where}.guidance" + (f"[{k}]" if isinstance(e["guidance"], list) else ""),
                              f"must be a non-negative guidance scale, got {g}")
            pipeline = self._pipeline(e, where)
            scheduler = self.string(e, "scheduler", prefix=where)
            if scheduler is not None:
                self._check_scheduler(scheduler, f"{where}.scheduler")
            negative = e.get("negative_prompt")
            if negative is not None and not isinstance(negative, str):
                self.fail(f"{where}.negative_prompt", f"expected a string, got {_type_name(negative)}")
            out.append(EntrySpec(name, role, pipeline, steps, guidance, scheduler, negative))
        return out

    def _pipeline(self, e: Mapping, where: str) -> str:
        value = self.string(e, "pipeline", required=True, prefix=where)
        key = f"{where}.pipeline"
        if value == "toy":
            if not (TOY_TEACHER / "model_index.json").is_file():
                self.fail(key, f"'toy' names the shipped toy teacher, but it is missing: expected a diffusers folder "
                               f"at {TOY_TEACHER}; recreate it with `stepdistill toy train-teacher`")
            return "toy"
        path = self.resolve(value, key, kind="dir")
        if not (Path(path) / "model_index.json").is_file():
            self.fail(key, f"{path} is not a diffusers pipeline folder: expected {Path(path) / 'model_index.json'} "
                           "(save one with pipe.save_pretrained(folder), or export a student)")
        return path

    def _check_scheduler(self, name: str, key: str) -> None:
        import diffusers
        from diffusers import SchedulerMixin

        cls = getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
            hint = difflib.get_close_matches(name, known, n=1)
            self.fail(key, f"{name!r} is not a diffusers scheduler class"
                           f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; e.g. DDIMScheduler, "
                           "EulerDiscreteScheduler, DPMSolverMultistepScheduler, LCMScheduler")
