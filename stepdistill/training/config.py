"""Typed, validated run configuration (the ``training/*.yaml`` recipes).

A recipe is a YAML mapping with the sections below; every key is optional except ``objective``::

    generator:        {timesteps: [999], lora_rank: null, lora_alpha: null, scaled_input_noise: false,
                       experts: false, init_unet: null,
                       teacher_sampler_steps: null, share_teacher_base: false, lora_targets: null,
                       consistency: null}   # or {steps: 4, scheduler: lcm, gamma: 0.3, guidance_scale: 1.0,
                                            #     guidance_embedding_dim: null} for LCM / TCD students
    optimizer:        {generator_lr: 1.0e-5, aux_lr: 1.0e-5, betas: [0.9, 0.999], weight_decay: 0.01, eps: 1.0e-8,
                       warmup_generator_lr: null}
    train:            {batch_size: 4, max_steps: 1000, grad_accum: 1, grad_clip: 1.0, mixed_precision: "no",
                       gradient_checkpointing: false, attention: sdpa, ema_decay: null, ema_halflife_kimg: null,
                       ema_rampup_ratio: null, checkpoint_every: 500, checkpoint_minutes: null,
                       keep_checkpoints: 3, sample_every: 0, log_every: 10, seed: 0, num_workers: 0,
                       count_flops: false, budget_flops: null, budget_marks: []}
    objective:        dmd2
    objective_config: {...}            # free-form here; the objective validates it
    prompts:          {source: toy}    # or a .txt (one prompt per line) / .jsonl ({"prompt": ...}) path
    selection_seeds:  []               # the evaluation seeds (bases) any value of this recipe was chosen on

:func:`load_recipe` reads such a file and applies ``key.sub=value`` overrides (values parsed as YAML). An unknown key,
a wrong type or an impossible value raises :class:`ConfigError` naming the dotted key and the file. ``0`` disables
``checkpoint_every`` and ``sample_every``; ``checkpoint_minutes`` also keeps a checkpoint once that many minutes of
training have passed since the last one (a killed run loses at most that much; null: by update count only);
``grad_clip: null`` disables clipping; ``ema_decay: null`` disables EMA (the EMA is diffusers' EMAModel: its decay at
update s is min(ema_decay, (1+s)/(10+s)); ``ema_halflife_kimg`` with ``ema_rampup_ratio`` is the EDM / official SiD
form instead, :class:`~stepdistill.models.ema.HalflifeEMA`). ``batch_size`` is per process. ``num_workers`` is
validated and kept for data-loading front ends; the Trainer itself draws prompts and noise in-process and does not use
it. ``warmup_generator_lr`` is the generator's learning rate while the objective is in its ODE-pair warm-up
(``objective_config.ode_warmup_steps``; null: ``generator_lr`` throughout). ``selection_seeds`` records the evaluation
seed bases (``stepdistill eval --seed``) whose samples any value of the recipe was chosen on; a comparison that must
be held out (``stepdistill league``) refuses to evaluate on them. ``count_flops`` counts the training FLOPs of every
update (:mod:`stepdistill.training.flops`; it slows an update by about a third on CPU); ``budget_flops`` (which
implies it) ends the run after the first update that brings the count to the budget, and ``budget_marks`` keeps a
checkpoint at each of those fractions of it (the run's end is the last mark): the league's budget (``stepdistill
league``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from stepdistill.core.validation import is_finite_number
from stepdistill.core.yaml_io import (
    YAMLFileError,
    load_yaml_file,
    parse_yaml_value,
)

MAX_TIMESTEP = 999
_MISSING = object()


class ConfigError(ValueError):
    """A recipe problem; ``key`` is the dotted path of the offending key and ``file`` the recipe it came from."""

    def __init__(self, key: str, problem: str, file: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {problem}")


class RecipeSyntaxError(ConfigError):
    """A recipe that is not valid YAML; the message is ``file:line:column: not valid YAML: ...``."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.key, self.problem, self.file = "<file>", message, None


# --- sections ----------------------------------------------------------------------------------------------------
@dataclass
class ConsistencySamplerConfig:
    """A consistency student (objectives ``lcm``, ``tcd``): sampled by diffusers' ``LCMScheduler`` or ``TCDScheduler``
    in any step count (``steps``: the default), TCD with γ = ``gamma`` (its ``eta``); ``guidance_scale``: the
    pipeline's value at inference (a student with a guidance embedding of ``guidance_embedding_dim`` dimensions is
    conditioned on guidance_scale − 1; one without samples at 1)."""

    steps: int = 4
    scheduler: Literal["lcm", "tcd"] = "lcm"
    gamma: float = 0.3
    guidance_scale: float = 1.0
    guidance_embedding_dim: int | None = None


@dataclass
class GeneratorConfig:
    timesteps: list[int] = field(default_factory=lambda: [999])
    lora_rank: int | None = None
    lora_alpha: float | None = None  # LoRA scale alpha/rank; null: alpha = rank
    scaled_input_noise: bool = False  # first step's input σ_{t0}·z instead of z (SiD-LSG's SD convention)
    experts: bool = False  # one expert per step (Phased DMD): full UNet copies, or LoRA adapters with lora_rank
    init_unet: str | None = None  # a diffusers UNet folder to start from instead of the teacher's (MSD after TSM)
    teacher_sampler_steps: int | None = None  # guidance-distilled denoiser sampled by DDIM in N steps (cfg_distill)
    share_teacher_base: bool = False  # LoRA on the teacher's own network: one base in memory (LoRA-CFG distillation;
    # with a score-distillation method the student and a LoRA fake score are two adapters on that base)
    lora_targets: list[str] | None = None  # module names LoRA adapts (null: the attention projections)
    consistency: ConsistencySamplerConfig | None = None  # LCM / TCD students (objectives lcm, tcd)


@dataclass
class OptimizerConfig:
    generator_lr: float = 1.0e-5
    aux_lr: float = 1.0e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1.0e-8
    warmup_generator_lr: float | None = None


@dataclass
class TrainConfig:
    batch_size: int = 4
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    ema_decay: float | None = None
    ema_halflife_kimg: float | None = None  # EDM / official SiD EMA (instead of ema_decay): half-life in 1000 images
    ema_rampup_ratio: float | None = None  # its ramp-up: half-life ≤ ratio × images seen (official SiD: 0.05)
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = None  # also checkpoint once this many minutes passed since the last one
    keep_checkpoints: int = 3
    sample_every: int = 0
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    count_flops: bool = False  # count the training FLOPs (stepdistill.training.flops); implied by budget_flops
    budget_flops: float | None = None  # end the run once the counted FLOPs reach this (max_steps stays a ceiling)
    budget_marks: list[float] = field(default_factory=list)  # fractions of budget_flops where a checkpoint is kept


@dataclass
class PromptsConfig:
    source: str = "toy"


@dataclass
class RunConfig:
    objective: str = ""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective_config: dict[str, Any] = field(default_factory=dict)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    selection_seeds: list[int] = field(default_factory=list)  # eval seeds any value here was chosen on (see below)

    # --- construction / serialisation ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], file: str | None = None) -> "RunConfig":
        """Build and validate from a plain mapping (as read from YAML); errors name ``file``."""
        if not isinstance(data, Mapping):
            raise ConfigError("<root>", f"the recipe must be a mapping of sections, got {type(data).__name__}", file)
        data = dict(data)
        if isinstance(data.get("prompts"), str):  # shorthand ``prompts: toy``
            data["prompts"] = {"source": data["prompts"]}
        if data.get("objective_config") is None and "objective_config" in data:
            data["objective_config"] = {}
        config = _build(cls, data, "", file)
        validate(config, file)
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"]["betas"] = list(out["optimizer"]["betas"])
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    def flat(self) -> dict[str, Any]:
        """``{"train.batch_size": 4, ...}`` (for loggers)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# --- generic typed construction ----------------------------------------------------------------------------------
def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, file: str | None) -> Any:
    """``value`` checked against the annotation ``tp`` (int accepted for float; bool never accepted for numbers)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping (section), got {value!r}", file)
        return _build(tp, value, key, file)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must be {_type_name(tp)}, got null", file)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, file)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # "X or null" given a wrong X: X's own message says more
            raise ConfigError(key, f"{errors[0].problem} (or null)", file)
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}", file)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in choices or isinstance(value, bool):
            raise ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}", file)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}", file)
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}", file)
        return tuple(_coerce(v, t, f"{key}[{i}]", file) for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {value!r}", file)
        return copy.deepcopy(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}", file)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}", file)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}", file)
        if not is_finite_number(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}", file)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}", file)
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not in the recipe


def _build(cls: type, data: Mapping[str, Any], prefix: str, file: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            allowed = ", ".join(names)
            raise ConfigError(_join(prefix, str(key)), f"unknown key (allowed here: {allowed})", file)
    kwargs = {name: _coerce(data[name], hints[name], _join(prefix, name), file) for name in names if name in data}
    return cls(**kwargs)


# --- value checks ------------------------------------------------------------------------------------------------
def validate(config: RunConfig, file: str | None = None) -> RunConfig:
    """Range and consistency checks (types were checked while building)."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(key, problem, file)

    if not config.objective or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", config.objective):
        fail("objective", f"must name an objective (e.g. 'dmd2'), got {config.objective!r}")

    g = config.generator
    if not g.timesteps:
        fail("generator.timesteps", "must hold at least one timestep")
    for i, t in enumerate(g.timesteps):
        if not 0 <= t <= MAX_TIMESTEP:
            fail(f"generator.timesteps[{i}]", f"must lie in [0, {MAX_TIMESTEP}], got {t}")
    for i in range(1, len(g.timesteps)):
        if g.timesteps[i] >= g.timesteps[i - 1]:
            fail(f"generator.timesteps[{i}]", f"timesteps must be strictly decreasing, got {g.timesteps}")
    if g.lora_rank is not None and g.lora_rank < 1:
        fail("generator.lora_rank", f"must be >= 1 (or null for full fine-tuning), got {g.lora_rank}")
    if g.lora_alpha is not None and not g.lora_alpha > 0:
        fail("generator.lora_alpha", f"must be > 0 (or null for alpha = rank), got {g.lora_alpha}")
    if g.experts and g.scaled_input_noise:
        fail("generator.experts", "phase experts start from pure noise z; set scaled_input_noise: false")
    if g.teacher_sampler_steps is not None:
        if g.teacher_sampler_steps < 1:
            fail("generator.teacher_sampler_steps", f"must be >= 1 (or null), got {g.teacher_sampler_steps}")
        if g.experts or g.init_unet is not None or g.scaled_input_noise:
            fail("generator.teacher_sampler_steps", "a guidance-distilled student starts from the teacher and is "
                 "sampled by DDIM: set experts: false, init_unet: null, scaled_input_noise: false")
    if g.lora_targets is not None and (not g.lora_targets or g.lora_rank is None):
        fail("generator.lora_targets", "names the modules LoRA adapts: a non-empty list, with lora_rank set")
    c = g.consistency
    if c is not None:
        if c.steps < 1:
            fail("generator.consistency.steps", f"must be >= 1, got {c.steps}")
        if not 0.0 <= c.gamma <= 1.0:
            fail("generator.consistency.gamma", f"must lie in [0, 1], got {c.gamma}")
        if c.guidance_embedding_dim is not None and c.guidance_embedding_dim < 2:
            fail("generator.consistency.guidance_embedding_dim", f"must be >= 2 (or null), got "
                 f"{c.guidance_embedding_dim}")
        if c.guidance_embedding_dim is not None and g.lora_rank is not None:
            fail("generator.consistency.guidance_embedding_dim", "a LoRA consistency student has no guidance "
                 "embedding (LCM-LoRA); set it to null or train a full student (lora_rank: null)")
        if c.guidance_scale < 0 or (c.guidance_embedding_dim is None and c.guidance_scale > 1.0):
            fail("generator.consistency.guidance_scale", "a student without a guidance embedding samples at "
                 f"guidance 1 (or below, which diffusers reads as no guidance), got {c.guidance_scale}")
        if g.experts or g.init_unet is not None or g.scaled_input_noise or g.teacher_sampler_steps is not None:
            fail("generator.consistency", "a consistency student starts from the teacher and pure noise: set "
                 "experts: false, init_unet: null, scaled_input_noise: false, teacher_sampler_steps: null")
    if g.share_teacher_base and (g.lora_rank is None or g.experts or g.init_unet is not None):
        fail("generator.share_teacher_base", "shares the teacher's network under LoRA adapters: it needs lora_rank "
             "(and experts: false, init_unet: null)")
    if g.init_unet is not None:
        if g.experts:
            fail("generator.init_unet", "phase experts start from the teacher; set init_unet: null")
        if not (Path(g.init_unet) / "config.json").is_file():
            fail("generator.init_unet", f"{g.init_unet} is not a diffusers UNet folder (no config.json there); give "
                 "the folder a UNet was saved to with save_pretrained, or null to start from the teacher")

    o = config.optimizer
    for name in ("generator_lr", "aux_lr", "eps"):
        if not getattr(o, name) > 0:
            fail(f"optimizer.{name}", f"must be > 0, got {getattr(o, name)}")
    if o.warmup_generator_lr is not None and not o.warmup_generator_lr > 0:
        fail("optimizer.warmup_generator_lr", f"must be > 0 (or null), got {o.warmup_generator_lr}")
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            fail(f"optimizer.betas[{i}]", f"must lie in [0, 1), got {b}")
    if o.weight_decay < 0:
        fail("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")

    t = config.train
    for name in ("batch_size", "max_steps", "grad_accum", "log_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            fail(f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    for name in ("checkpoint_every", "sample_every", "seed", "num_workers"):
        if getattr(t, name) < 0:
            fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if t.checkpoint_minutes is not None and not t.checkpoint_minutes > 0:
        fail("train.checkpoint_minutes", f"must be > 0 (or null: checkpoints by update count only), got "
             f"{t.checkpoint_minutes}")
    if t.grad_clip is not None and not t.grad_clip > 0:
        fail("train.grad_clip", f"must be > 0 (or null to disable clipping), got {t.grad_clip}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        fail("train.ema_decay", f"must lie in (0, 1) (or null to disable EMA), got {t.ema_decay}")
    if t.ema_halflife_kimg is not None:
        if t.ema_decay is not None:
            fail("train.ema_halflife_kimg", "and train.ema_decay are two forms of the EMA: set one of them, the other "
                 "to null")
        if not t.ema_halflife_kimg > 0:
            fail("train.ema_halflife_kimg", f"must be > 0 (or null), got {t.ema_halflife_kimg}")
    if t.budget_flops is not None and not t.budget_flops > 0:
        fail("train.budget_flops", f"must be > 0 (or null for a run of train.max_steps updates), got {t.budget_flops}")
    if t.budget_marks:
        if t.budget_flops is None:
            fail("train.budget_marks", "are fractions of train.budget_flops: set the budget too (or leave the marks [])")
        for i, mark in enumerate(t.budget_marks):
            if not 0.0 < mark < 1.0:
                fail(f"train.budget_marks[{i}]", f"must lie in (0, 1) (the run's end is always a mark), got {mark}")
            if i and mark <= t.budget_marks[i - 1]:
                fail(f"train.budget_marks[{i}]", f"marks must be increasing, got {t.budget_marks}")
    if t.ema_rampup_ratio is not None:
        if t.ema_halflife_kimg is None:
            fail("train.ema_rampup_ratio", "ramps up the half-life EMA: set train.ema_halflife_kimg too")
        if not t.ema_rampup_ratio > 0:
            fail("train.ema_rampup_ratio", f"must be > 0 (or null), got {t.ema_rampup_ratio}")

    for i, seed in enumerate(config.selection_seeds):
        if seed < 0:
            fail(f"selection_seeds[{i}]", f"must be >= 0 (an evaluation seed base), got {seed}")
    src = config.prompts.source
    if src != "toy" and Path(src).suffix.lower() not in (".txt", ".jsonl"):
        fail("prompts.source", f"must be 'toy' or a path to a .txt or .jsonl prompt file, got {src!r}")
    return config


# --- files and overrides -------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.sub=value", None)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, "an override must look like key.sub=value", None)
    try:
        value = parse_yaml_value(raw, where=f"override {text!r}") if raw.strip() else ""
    except YAMLFileError as e:
        raise ConfigError(key, f"cannot parse the override value {raw!r}: {e}", None) from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], file: str | None = None) -> dict[str, Any]:
    """Set each ``key.sub=value`` in a copy of ``data``; intermediate mappings are created when absent (an unknown
    key is then reported by validation)."""
    data = copy.deepcopy(data)
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(e.key, e.problem, file) from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if part == "prompts" and isinstance(nxt, str):
                nxt = {"source": nxt}
                node[part] = nxt
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is not a section, cannot set {text!r}", file)
            node = nxt
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply ``key.sub=value`` overrides and validate; problems raise :class:`ConfigError`."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ConfigError("<file>", "recipe file not found", file)
    try:
        data = load_yaml_file(path)
    except YAMLFileError as e:
        raise RecipeSyntaxError(str(e)) from None
    return recipe_from_data({} if data is None else data, file, overrides)


def recipe_from_data(data: Any, file: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A recipe already read (a mapping) with ``key.sub=value`` overrides applied, validated; errors name ``file``
    and the override that set the offending key."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"the recipe must be a mapping of sections, got {type(data).__name__}", file)
    data = apply_overrides(data, list(overrides), file)
    try:
        return RunConfig.from_dict(data, file=file)
    except ConfigError as e:
        touched = [o for o in overrides if e.key.split("[")[0] == o.split("=", 1)[0].strip()]
        if touched:
            raise ConfigError(e.key, f"{e.problem} (set by override {touched[-1]!r})", file) from None
        raise
