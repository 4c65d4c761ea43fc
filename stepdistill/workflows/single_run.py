"""``stepdistill distill``: compose a model choice (pipelines/*.yaml), a recipe (training/*.yaml) and an output folder
into a training run, then export the student as a diffusers pipeline folder (``<out>/student``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from stepdistill.core.outputs import check_output_folder
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.core.yaml_io import load_yaml_file
from stepdistill.eval.generate import image_grid
from stepdistill.export.model_card import GENERIC_EXAMPLE_PROMPT
from stepdistill.export.students import export_student
from stepdistill.models.generators import generator_class
from stepdistill.models.image_embedders import CLIPImageEmbedder
from stepdistill.models.teacher import Teacher, _resolve_source
from stepdistill.objectives import (
    ObjectiveConfigError,
    Requirements,
    build_objective,
    objective_class,
)
from stepdistill.objectives.regression import make_regression_pairs
from stepdistill.toy import world
from stepdistill.toy.assets import TOY_FLOW_TEACHER, TOY_TEACHER, check_toy_vocabulary, is_toy_model
from stepdistill.toy.embedder import ToyEmbedder
from stepdistill.training.batches import build_batch
from stepdistill.training.config import ConfigError, load_recipe
from stepdistill.training.flops import FlopMeter
from stepdistill.training.prompts import PromptSource
from stepdistill.training.runfolder import config_error_from_objective, plan_run
from stepdistill.training.stages import record_degradation_path
from stepdistill.training.trainer import Trainer

PIPELINE_KEYS = {"teacher", "dtype", "single_file_config", "real_images", "resolution", "embedded_guidance"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PipelineSpec:
    teacher: str
    dtype: str = "float32"
    single_file_config: str | None = None
    real_images: str | None = None
    resolution: int | None = None
    embedded_guidance: float | None = None  # FLUX.1-dev's distilled guidance (default 3.5)


def load_pipeline_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipelines/*.yaml file; unknown keys and bad values name the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline spec {path} not found (see pipelines/*.yaml for examples)")
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {sorted(PIPELINE_KEYS)}")
    unknown = sorted(set(data) - PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(PIPELINE_KEYS))}")
    if "teacher" not in data:
        raise ValueError(f"{path}: missing key 'teacher' (a diffusers folder, a .safetensors file or 'toy')")
    if data.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {data.get('dtype')!r}")
    if data.get("real_images") not in (None, "toy"):
        raise ValueError(f"{path}: real_images: only 'toy' (or null) is supported so far, got {data['real_images']!r}")
    return PipelineSpec(**data)


def toy_real_latents(teacher, seed: int = 0, prompts=None):
    """A real-data source for DMD2's GAN on the toy world: ``(n, torch.Generator) -> (latents, prompts)``, rendering
    fresh world images and encoding them with the teacher's VAE. With ``prompts`` (a PromptSource: e.g. one MSD
    student's subset) the images are of those prompts only; without, uniform over the world."""
    def source(n: int, generator: torch.Generator):
        draw = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        chosen = prompts.sample(n, generator) if prompts is not None else None
        images, attrs = world.sample(seed * 1_000_003 + draw, n, prompts=chosen)
        with torch.no_grad():
            latents = teacher.encode(torch.from_numpy(images).to(teacher.device, teacher.dtype))
        return latents.float(), attrs.prompts()

    return source


def _all_toy(prompts: Sequence[str]) -> bool:
    try:
        for p in prompts:
            world.parse_prompt(p)
    except ValueError:
        return False
    return True


def with_regression_pairs(pairs, base_batch_fn):
    """Wrap the trainer's batch builder so each batch also carries a random subset of DMD's (z_ref, c_ref, y_ref),
    drawn from the batch's own generator (``rng``): a run resumed after the warm-up, which makes no pairs, draws the
    same timesteps and noise as an uninterrupted one."""

    def batch_fn(teacher, prompts, noise, *args, rng: torch.Generator | None = None, **kwargs):
        batch = base_batch_fn(teacher, prompts, noise, *args, rng=rng, **kwargs)
        idx = torch.randint(0, len(pairs), (len(prompts),), generator=rng)
        chosen = pairs.select(idx).to(batch.noise.device)  # the training device (base_batch_fn moved the batch there)
        batch.pairs = chosen
        return batch

    return batch_fn


def make_sample_fn(teacher, prompts: Sequence[str], seed: int = 1234):
    """``(generator, step) -> PIL grid`` of the generator's samples for fixed prompts and noise."""
    prompts = list(prompts)
    noise = torch.randn((len(prompts), *teacher.latent_shape), generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample_fn(generator, step: int):
        embeds = teacher.encode_prompt(prompts, with_uncond=False)
        device = next(generator.parameters()).device
        x0 = generator.sample(noise.to(device), embeds.to(device), generator=torch.Generator(device).manual_seed(seed))
        images = teacher.decode(x0.to(teacher.dtype)).float().cpu()
        return image_grid(images, rows=1, cols=len(prompts), scale=4)

    return sample_fn


def teacher_schedule(spec: PipelineSpec):
    """The teacher's :class:`~stepdistill.core.schedule.NoiseSchedule`, read from its scheduler config without loading
    any model (None when the config cannot be found or read; the teacher load later checks the rest). A missing
    teacher path is an error here, before anything is written."""
    source = _resolve_source(spec.teacher)
    folder = source if source.is_dir() else (Path(spec.single_file_config) if spec.single_file_config else None)
    cfg = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        return NoiseSchedule.from_config(json.loads(cfg.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError):
        return None


def validate_run(pipeline: str | Path, recipe: str | Path, overrides: Sequence[str] = ()):
    """The pipeline preset, the recipe with its overrides and the objective's config, all checked before any model
    loads or any file is written; returns ``(spec, config)``. Errors name the file, the key and the override."""
    spec = load_pipeline_spec(pipeline)
    config = load_recipe(recipe, overrides)
    return spec, check_run_config(spec, config, recipe, overrides, pipeline)


def check_run_config(spec: PipelineSpec, config, recipe: str | Path, overrides: Sequence[str] = (),
                     pipeline: str | Path | None = None):
    """The checks of :func:`validate_run` on a recipe already loaded (``recipe`` and ``pipeline`` name the files in
    errors); returns ``config``."""
    schedule = teacher_schedule(spec)
    T = schedule.num_train_timesteps if schedule is not None else 1000
    try:
        cls = objective_class(config.objective)
    except ValueError as e:
        raise ConfigError("objective", str(e), str(recipe)) from None
    try:
        cfg = cls.check_config(config.objective_config, T)
    except ObjectiveConfigError as e:
        raise config_error_from_objective(e, recipe, overrides) from None
    needs = cls.requirements(cfg)
    need = needs.min_train_steps
    if config.train.max_steps < need:
        raise ConfigError("train.max_steps", f"must be at least {need} for {config.objective} with this objective_config "
                          f"(every phase must run), got {config.train.max_steps}", str(recipe))
    teacher_sampler = needs.student == "teacher_sampler"
    if teacher_sampler != (config.generator.teacher_sampler_steps is not None):
        problem = ("must be set (e.g. 25) for objective " if teacher_sampler
                   else "must be null (it is for guidance distillation, objective cfg_distill) for objective ")
        raise ConfigError("generator.teacher_sampler_steps", problem + config.objective, str(recipe))
    consistency = needs.student == "consistency"
    if consistency != (config.generator.consistency is not None):
        problem = ("must be set (e.g. {steps: 4, scheduler: lcm}) for objective " if consistency
                   else "must be null (it is for the consistency objectives lcm and tcd) for objective ")
        raise ConfigError("generator.consistency", problem + config.objective, str(recipe))
    experts = needs.student == "phase_experts"
    if experts != bool(config.generator.experts):
        want = "true" if experts else "false"
        raise ConfigError("generator.experts", f"must be {want} for objective {config.objective}", str(recipe))
    for i, t in enumerate(config.generator.timesteps):
        if t >= T:
            raise ConfigError(f"generator.timesteps[{i}]", f"must be below the teacher's {T} timesteps, got {t}",
                              str(recipe))
    problem = cls.generator_timesteps_problem(cfg, list(config.generator.timesteps), schedule) if schedule else None
    if problem is not None:
        raise ConfigError("generator.timesteps", problem, str(recipe))
    if needs.real_images and spec.real_images != "toy":
        raise ValueError(f"{pipeline or 'the pipeline preset'}: the {config.objective} GAN term needs real images; set "
                         "real_images: toy (other sources are not supported yet) or objective_config.gan_enabled=false")
    return config


def run_warnings(config) -> list[str]:
    """What a valid run does that its user probably did not mean: a run that ends within its ODE-pair warm-up
    exports a student that never had an update of its method."""
    cfg = objective_class(config.objective).check_config(config.objective_config)
    warm = int(cfg.get("ode_warmup_steps") or 0)
    out = []
    if warm and config.train.max_steps <= warm:
        out.append(f"train.max_steps ({config.train.max_steps}) ends within the {warm}-update ODE-pair warm-up "
                   f"(objective_config.ode_warmup_steps): the student will have had no {config.objective} update, "
                   "only regression onto the teacher's ODE pairs")
    return out


def load_prompts(source: str | Path) -> PromptSource:
    """The prompts a recipe's ``prompts.source`` names: ``"toy"`` (every prompt of the toy world) or a .txt / .jsonl
    file (:meth:`~stepdistill.training.prompts.PromptSource.from_spec`)."""
    if str(source) == "toy":
        return PromptSource(world.all_prompts(), name="toy")
    return PromptSource.from_spec(source)


def load_run_prompts(spec: PipelineSpec, config, recipe: str | Path):
    """The training prompts of a run, read before any model loads or file is written; a missing or malformed file,
    or a word the toy teacher's closed vocabulary lacks, is a ConfigError naming ``prompts.source`` and the
    recipe."""
    try:
        prompts = load_prompts(config.prompts.source)
        if is_toy_model(spec.teacher):
            check_toy_vocabulary(prompts.prompts, str(config.prompts.source))
    except (OSError, ValueError) as e:
        raise ConfigError("prompts.source", str(e), str(recipe)) from None
    return prompts


def load_teacher(spec: PipelineSpec):
    """The teacher a pipeline spec names, in its dtype (and single-file config), at its resolution (SD3/FLUX) and
    embedded guidance (FLUX.1-dev)."""
    return Teacher.load(spec.teacher, dtype=DTYPES[spec.dtype], config=spec.single_file_config,
                        resolution=spec.resolution, embedded_guidance=spec.embedded_guidance)


def run_requirements(config) -> Requirements:
    """What the run's objective declares it needs with the run's objective config (nothing is built)."""
    cls = objective_class(config.objective)
    return cls.requirements(cls.check_config(config.objective_config))


def upcast_for_gradient(teacher, config, log=None) -> list[str]:
    """Cast to float32 the teacher components the run's objective backpropagates through
    (``Requirements.teacher_in_gradient``) when the preset loaded them in a lower precision; returns what
    was cast (each said in one line to ``log``)."""
    cast = []
    for name in run_requirements(config).teacher_in_gradient:
        module = getattr(teacher, name)
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            module.to(torch.float32)
            cast.append(name)
            if log is not None:
                log(f"[distill] {config.objective} backpropagates through the teacher's {name}: running it in float32 "
                    f"(the pipeline preset loads it in {str(dtype).replace('torch.', '')})")
    return cast


def teacher_dtypes(teacher) -> dict[str, str]:
    """The dtype of each of the teacher's networks, e.g. ``{"unet": "float32", "vae": "bfloat16", ...}``."""
    out = {}
    for name, module in teacher.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            params = list(module.parameters())
            if params:
                out[name] = str(params[0].dtype).replace("torch.", "")
    return out


def load_image_embedder(spec: str, teacher) -> torch.nn.Module:
    """The image embedding ``spec`` names, on the teacher's device: ``"toy"`` → the toy evaluator's features
    (:class:`~stepdistill.toy.embedder.ToyEmbedder`), otherwise a local CLIP folder
    (:class:`~stepdistill.models.image_embedders.CLIPImageEmbedder`)."""
    embedder = ToyEmbedder(teacher) if spec == "toy" else CLIPImageEmbedder(teacher, spec)
    return embedder.to(teacher.device)


def _build(spec: PipelineSpec, config, training: bool = False, log=None):
    """The teacher, the generator and the objective of a run. Everything random they hold at the start (LoRA
    adapters, GAN heads, freshly initialised networks) is drawn after seeding with ``train.seed``, so two runs of
    one recipe start from the same weights, and a resumed run is comparable with an uninterrupted one. For
    ``training``, the teacher components the objective backpropagates through run in float32
    (:func:`upcast_for_gradient`); an export keeps the preset's dtype."""
    from accelerate.utils import set_seed

    teacher = load_teacher(spec)
    if training:
        upcast_for_gradient(teacher, config, log)
    set_seed(config.train.seed)
    needs = run_requirements(config)
    generator = generator_class(needs.student).from_config(teacher, config.generator)  # kind checked before
    objective = build_objective(config.objective, teacher, generator, config.objective_config)
    if needs.image_embedder is not None:  # built at its first use, as the objective asks
        objective.image_embedder_loader = functools.partial(load_image_embedder, needs.image_embedder, teacher)
    return teacher, generator, objective


def default_example_prompt(teacher) -> str:
    """A prompt the teacher's text encoder can read: a toy-world prompt for the shipped toy teacher (its tokenizer
    knows only the toy vocabulary), else a generic one."""
    source = str(getattr(teacher, "source", ""))
    if source == "toy" or (source and Path(source).resolve() in (Path(TOY_TEACHER).resolve(),
                                                                   Path(TOY_FLOW_TEACHER).resolve())):
        return world.make_prompt("cross", "blue", "large", "white")
    return GENERIC_EXAMPLE_PROMPT


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str = "latest",
               overwrite: bool = False) -> Path:
    """Export the student of a distillation run (its ``run_config.yaml``, ``pipeline.yaml`` and a checkpoint) as a
    diffusers pipeline folder (default ``<run_dir>/student``). ``out_dir`` is checked before anything loads: it may
    be absent, empty or an earlier student folder (anything else only with ``overwrite``), and never the run folder
    itself or a folder that holds it."""
    run = Path(run_dir)
    for name in ("run_config.yaml", "pipeline.yaml"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: {run} is not a `stepdistill distill` output folder")
    out_dir = check_output_folder(out_dir if out_dir is not None else run / "student", overwrite=overwrite,
                                  protect=[run] if out_dir is not None else [])
    spec = load_pipeline_spec(run / "pipeline.yaml")
    config = load_recipe(run / "run_config.yaml")
    teacher, generator, objective = _build(spec, config)
    trainer = Trainer(config, teacher, generator, objective, ["unused"], run)
    loaded = trainer.load_checkpoint(checkpoint)
    if loaded is None:
        raise FileNotFoundError(f"no checkpoint {checkpoint!r} under {run / 'checkpoints'}")
    example = load_prompts(config.prompts.source).prompts[0]
    return export_student(teacher, generator, out_dir, method=config.objective, overwrite=overwrite,
                          steps_info={"steps": trainer.state.step, "checkpoint": loaded.name}, example_prompt=example)


def distill_single(
    pipeline: str | Path,
    recipe: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    export: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    dry_run: bool = False,
    log=print,
) -> dict[str, Any]:
    """Train a student as ``recipe`` says on the teacher ``pipeline`` names; export it to ``<out_dir>/student``.

    Everything is validated first (:func:`validate_run`) and the output folder is checked
    (:func:`stepdistill.training.runfolder.plan_run`): a fresh run refuses a folder that holds another run unless
    ``overwrite``; ``resume`` refuses a checkpoint of another configuration unless ``allow_config_change``.
    ``dry_run`` stops there and returns ``{"dry_run": True, "config": ..., "plan": ...}`` with nothing written."""
    spec, config = validate_run(pipeline, recipe, overrides)
    prompts = load_run_prompts(spec, config, recipe)
    warnings = run_warnings(config)
    out = Path(out_dir)
    plan = plan_run(config, spec, out, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    if dry_run:
        return {"dry_run": True, "config": config.to_dict(), "pipeline": dataclasses.asdict(spec),
                "fingerprint": plan.fingerprint, "out": str(out),
                "resume_from": str(plan.resume_from) if plan.resume_from else None, "start_step": plan.start_step,
                "notes": plan.notes + [f"warning: {w}" for w in warnings], "remove": [str(p) for p in plan.remove]}
    for note in plan.notes:
        log(f"[distill] {note}")
    for warning in warnings:
        log(f"[distill] warning: {warning}")
    plan.apply()
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(Path(pipeline).read_text())
    plan.write_run_file(recipe, pipeline, overrides)
    t0 = time.time()
    teacher, generator, objective = _build(spec, config, training=True, log=log)
    needs = objective.requirements(objective.config)
    if needs.uses_run_folder:  # DisBack records its path into the run folder
        def disback_embeds(n: int, rng: torch.Generator):
            return teacher.encode_prompt(prompts.sample(n, rng), with_uncond=True)

        objective.attach_run(out, disback_embeds, config.train.batch_size, seed=config.train.seed + 23,
                             run_fingerprint=plan.fingerprint, log=lambda line: log(f"[distill] {line}"),
                             record_path=record_degradation_path)

    batch_fn = build_batch
    pairs_seconds = None
    pair_flops = FlopMeter(enabled=config.train.count_flops or config.train.budget_flops is not None)
    if needs.regression_pairs_needed(from_step=plan.start_step):
        from accelerate import PartialState

        teacher.to(PartialState().device)  # make the pairs on the training device (the Trainer would move it there)
        oc = objective.config
        n_pairs = int(oc["regression_pairs"] or 4 * config.train.batch_size)
        guidance = objective.pair_guidance()
        pair_prompts = prompts.sample(n_pairs, torch.Generator().manual_seed(config.train.seed + 17))
        t_pairs = time.time()
        with pair_flops:  # the teacher's ODE is part of the run's training cost
            pairs = make_regression_pairs(teacher, pair_prompts, num_steps=int(oc["regression_steps"]),
                                          guidance=guidance, generator=torch.Generator().manual_seed(config.train.seed + 18),
                                          batch_size=64, progress=True)
        pairs_seconds = round(time.time() - t_pairs, 1)
        batch_fn = with_regression_pairs(pairs, build_batch)

    subset = prompts if config.prompts.source != "toy" and _all_toy(prompts.prompts) else None  # e.g. an MSD subset
    real_source = toy_real_latents(teacher, config.train.seed, subset) if needs.real_images else None
    sample_prompts = prompts.sample(8, torch.Generator().manual_seed(99))
    trainer = Trainer(config, teacher, generator, objective, prompts, out, real_latent_source=real_source,
                      sample_fn=make_sample_fn(teacher, sample_prompts), batch_fn=batch_fn,
                      run_identity={"fingerprint": plan.fingerprint, "identity": plan.identity},
                      sample_prompts=sample_prompts, setup_flops=pair_flops.total,
                      setup_seconds=pairs_seconds or 0.0)
    if export and trainer.fsdp:
        raise NotImplementedError("exporting a student trained under FSDP is not supported (its weights are sharded "
                                  "across the processes); run distill with --no-export")
    if plan.resume_from is not None:
        log(f"[distill] resumed from {plan.resume_from.name} (step {plan.start_step}; run fingerprint "
            f"{plan.fingerprint})")
    summary = trainer.train(resume=plan.resume_from)
    summary["total_seconds"] = round(time.time() - t0, 1)
    summary["fingerprint"] = plan.fingerprint
    summary["teacher_dtypes"] = teacher_dtypes(teacher)
    if warnings:
        summary["warnings"] = warnings
    if pairs_seconds is not None:
        summary["regression_pairs_seconds"] = pairs_seconds
        if pair_flops.enabled:
            summary["regression_pairs_flops"] = pair_flops.total
    if export and trainer.accelerator.is_main_process:
        student_dir = export_student(teacher, generator, out / "student", method=config.objective,
                                     steps_info=summary, example_prompt=sample_prompts[0])
        summary["student"] = str(student_dir)
    (out / "distill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
