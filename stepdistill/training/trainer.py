"""The training loop: any :class:`~stepdistill.objectives.base.Objective` on ``accelerate``.

One generator update per step and ``objective.aux_updates_per_generator_update`` auxiliary updates (two time-scale
update rule), as the objective's :meth:`~stepdistill.objectives.base.Objective.plan_update` says before each update:
the auxiliary updates first, or the generator first (``UpdatePlan.generator_first``: the official DMD2 / SwiftBrush
order, whose first auxiliary update reuses the generator update's sample), none in an ODE-pair warm-up, fresh
auxiliary optimizer moments after a re-initialisation, and finished Phased DMD experts set to their EMA
(:mod:`.stages`). Each update is ``train.grad_accum`` micro-batches through ``accelerator.accumulate``, gradient
clipping by ``accelerator.clip_grad_norm_`` and one AdamW step (one optimizer for the generator, one per
``objective.auxiliary_parameters()`` entry). After the generator update the EMA (if any) is updated.

What is prepared by accelerate: a single module holding the objective (its auxiliary networks) and the generator,
whose ``forward(batch, turn)`` calls ``objective.generator_loss`` or ``objective.auxiliary_loss``. Routing the losses
through the prepared module's forward is what lets DistributedDataParallel synchronise the gradients of whatever the
objective touches (``find_unused_parameters=True``: each turn only trains a subset). The teacher is frozen and moved
to ``accelerator.device``; it is not part of the prepared module.

Under FSDP (FSDP2 only, ``training/accelerate/fsdp.yaml``) each trainable network is prepared on its own with its
own optimizer: the generator first, then the module owning each ``objective.auxiliary_parameters()`` group (DMD2's
fake score, its discriminator head; :func:`.fsdp.owning_modules`), because accelerate's FSDP2 ``prepare`` takes one
model per call and its FSDP ``save_state``/``load_state`` pair optimizer *i* with model *i*. ``fully_shard`` hooks
each network's own forward, so the losses are the objective's methods called directly (no wrapper module), and
the parameter lists are read again after ``prepare`` (they are DTensors then). Checkpoints are accelerate's sharded
ones (``pytorch_model_fsdp_<i>/``, ``optimizer_<i>/``: torch.distributed.checkpoint folders, one file per process;
the EMA is saved whole, gathered, and re-sharded on load) and resume exactly with the same number of processes.
The frozen teacher stays unsharded, a full copy on every process and outside every optimizer; sharding it too is
feasible (``fully_shard`` accepts a module without trainable parameters and without an optimizer, gathering its
weights in each forward) but is not done. Not under FSDP: the saved-activation measurement, and the in-process
export of the student (``distill`` refuses it; run with ``--no-export``). accelerate does not enable FSDP on CPU; a
Trainer that builds its own accelerator does (:func:`.fsdp.enable_fsdp_on_cpu`), which is how the tests run it.

Reproducibility: ``accelerate.utils.set_seed(train.seed, device_specific=True)`` for the global RNGs (objectives
draw timesteps from them) and, per micro-batch, a ``torch.Generator`` seeded from (seed, step, turn, update,
micro-batch, process) for the prompts, the generator noise and the real latents, so a batch depends only on where it
is in the run. Checkpoints restore the RNG states, the optimizers, the EMA and the step counter, so a run resumed
from step k reaches step n with the same parameters as an uninterrupted one.

Budget: with ``train.count_flops`` (or ``train.budget_flops``) the training FLOPs of each update are counted
(:mod:`.flops`): the objective's losses and their backward passes, every network in them (generator, teacher, fake
score, discriminator, target network). Not counted: building the batch (prompt encoding, encoding real images: data
preparation that a dataset can cache), the optimizer and EMA steps, and sampling for the logs. Work done once before
the loop for the run (the teacher's ODE pairs) is passed in as ``setup_flops`` and starts the count. Under several
processes the count is the sum over them. ``train.budget_flops`` ends the run after the first update that brings the
count to the budget (``max_steps`` stays a ceiling); a checkpoint is kept at each ``train.budget_marks`` fraction and
at the end, listed with its step and FLOPs in ``logs/budget_marks.json`` (and in the checkpointed state, so a
resumed run neither repeats nor loses a mark).

Outputs under ``out_dir``: ``checkpoints/step_XXXXXX`` + ``checkpoints/latest`` (see :mod:`.checkpoint`),
``logs/metrics.csv``, ``logs/tensorboard/``, ``logs/summary.json``, ``samples/step_XXXXXX.png`` (when a
``sample_fn`` is given), ``logs/budget_marks.json`` (with a budget) and ``run_config.yaml``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from stepdistill.core.interrupts import StopRequest
from stepdistill.core.outputs import write_text_atomic
from stepdistill.models.ema import GeneratorEMA, HalflifeEMA, attach_ema
from stepdistill.models.shared_base import AdapterView, adapter_checkpointing
from stepdistill.objectives.base import UpdatePlan
from stepdistill.training.activations import SavedTensorBytes
from stepdistill.training.batches import TURNS, batch_seed, build_batch
from stepdistill.training.checkpoint import (
    CheckpointError,
    TrainableStateHooks,
    TrainState,
    checkpoint_name,
    find_resume_checkpoint,
    latest_checkpoint,
    read_marker,
    save_checkpoint,
)
from stepdistill.training.config import RunConfig
from stepdistill.training.flops import FlopMeter, format_flops
from stepdistill.training.fsdp import enable_fsdp_on_cpu, full_tensor, owning_modules, wrap_classes_present
from stepdistill.training.progress import (
    CSVLogger,
    PhaseETA,
    peak_memory,
    tensorboard_hparams,
    training_state_bytes,
)
from stepdistill.training.prompts import as_prompt_sampler
from stepdistill.training.stages import finalise_experts

logger = logging.getLogger(__name__)


def _mark_key(fraction: float) -> str:
    """The key of a budget mark in the checkpointed state: ``0.25`` -> ``"0.25"``."""
    return f"{fraction:g}"


def _clock(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``; ``"?"`` while unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class TrainingDiverged(RuntimeError):
    """A loss (or gradient norm) became NaN/inf. ``step`` is the 1-based number of the update that failed; nothing of
    that update was applied and no checkpoint of it was written."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: str | None = None) -> None:
        self.step = step
        self.what = what
        self.value = value
        self.last_checkpoint = last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"training diverged at step {step}: {what} is {value} (non-finite). The update was not applied and no "
            f"checkpoint of this state was written; {where}. Lower the learning rate, enable grad_clip or check "
            "the objective's settings."
        )


# --- batches ------------------------------------------------------------------------------------------------------


class _TrainModule(torch.nn.Module):
    """What accelerate prepares: the objective (its auxiliary networks) plus the generator; the forward computes one
    of the two losses so that DDP sees every parameter the objective uses."""

    def __init__(self, objective: torch.nn.Module, generator: torch.nn.Module) -> None:
        super().__init__()
        self.objective = objective
        if not any(m is generator for m in objective.modules()):
            self.generator = generator

    def forward(self, batch, turn: str):
        if turn == "generator":
            return self.objective.generator_loss(batch)
        return self.objective.auxiliary_loss(batch)


# --- the trainer --------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``generator`` with ``objective`` (see the module docstring).

    ``prompt_source``: a :class:`PromptSource`, a spec (``"toy"`` / a .txt / .jsonl path), a list of prompts or a
    callable ``(n, torch.Generator) -> list[str]``. ``real_latent_source``: optional ``(n, torch.Generator) -> tensor``
    of encoded real images, or ``-> (tensor, prompts)`` to condition them on their own captions. ``sample_fn``:
    optional ``(generator, step) -> PIL.Image`` called every ``train.sample_every`` steps on the main process (again
    with the EMA weights when EMA is on), under ``torch.no_grad`` and a forked RNG so that it does not change the
    training run. ``batch_fn`` replaces :func:`build_batch` (same signature). ``accelerator``: reuse an existing
    one (else one is built from the config). ``setup_flops``: FLOPs spent for this run before the loop (counted with
    :class:`~stepdistill.training.flops.FlopMeter`), the start of the FLOP count of a fresh run; ``setup_seconds``:
    the wall time that work took, the start of its training seconds.

    Not supported: DeepSpeed with objectives that have auxiliary networks, and FSDP1 (refused with a clear error);
    FSDP2 is (see the module docstring).
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any],
        teacher,
        generator: torch.nn.Module,
        objective: torch.nn.Module,
        prompt_source: Any,
        out_dir: str | Path,
        real_latent_source: Callable[[int, torch.Generator], torch.Tensor] | None = None,
        *,
        sample_fn: Callable[[torch.nn.Module, int], Any] | None = None,
        batch_fn: Callable[..., Any] | None = None,
        accelerator=None,
        run_identity: Mapping[str, Any] | None = None,
        sample_prompts: Sequence[str] | None = None,
        setup_flops: int = 0,
        setup_seconds: float = 0.0,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import (
            DistributedDataParallelKwargs,
            ProjectConfiguration,
            set_seed,
        )

        if not isinstance(config, RunConfig):
            config = RunConfig.from_dict(config)
        self.config = config
        tc = config.train
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.log_dir = self.out_dir / "logs"
        self.teacher = teacher
        self.generator = generator
        self.objective = objective
        self.saved_activation_bytes: dict[str, int] = {}  # per phase, first generator update (see activations.py)
        self.sample_prompts = as_prompt_sampler(prompt_source)
        self.real_latent_source = real_latent_source
        self.sample_fn = sample_fn
        self.sample_prompt_list = list(sample_prompts) if sample_prompts is not None else None
        self.run_identity = dict(run_identity or {})
        self.batch_fn = batch_fn or build_batch

        own_accelerator = accelerator is None
        if accelerator is None:
            accelerator = Accelerator(
                mixed_precision=tc.mixed_precision,
                gradient_accumulation_steps=tc.grad_accum,
                log_with="tensorboard",
                project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.log_dir)),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            )
        if own_accelerator:
            enable_fsdp_on_cpu(accelerator)  # accelerate leaves an FSDP launch on CPU at DDP (see .fsdp)
        self.accelerator = accelerator
        set_seed(tc.seed, device_specific=True)
        device = accelerator.device

        # frozen teacher on the training device
        teacher_device = getattr(teacher, "device", None)
        if hasattr(teacher, "to") and (teacher_device is None or torch.device(teacher_device) != device):
            teacher.to(device)

        self.requirements = objective.requirements(objective.config)
        self._configure_modules()

        # optimizers: one for the generator, one per auxiliary parameter group
        oc = config.optimizer
        gen_params = list(generator.trainable_parameters())
        if not gen_params:
            raise ValueError("the generator has no trainable parameters (requires_grad=True)")
        gen_ids = {id(p) for p in gen_params}
        aux_groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, params in dict(objective.auxiliary_parameters()).items():
            params = [p for p in params if p.requires_grad]
            if not params:
                logger.warning("auxiliary parameter group %r is empty; it gets no optimizer", name)
                continue
            if any(id(p) in gen_ids for p in params):
                raise ValueError(f"auxiliary parameter group {name!r} shares parameters with the generator")
            aux_groups[name] = params
        self.plan = UpdatePlan()  # the current update's (Objective.plan_update)
        self.aux_ratio = int(objective.aux_updates_per_generator_update)
        if self.aux_ratio > 0 and not aux_groups:
            logger.warning("objective %s declares auxiliary updates but has no auxiliary parameters; skipping them",
                           objective.name)
            self.aux_ratio = 0

        from accelerate.utils import DistributedType

        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        if aux_groups and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError(
                f"DeepSpeed is not supported for objectives with auxiliary networks ({', '.join(aux_groups)}): "
                "accelerate drives one DeepSpeed engine per model and optimizer. Use FSDP2 "
                "(training/accelerate/fsdp.yaml), DDP (training/accelerate/ddp.yaml) or a single GPU."
            )
        if self.fsdp and self._shared_bases():
            raise NotImplementedError(
                "FSDP with generator.share_teacher_base is not supported: the adapters live inside the teacher's "
                "unsharded base. Use DDP (training/accelerate/ddp.yaml) or a single GPU for a shared base, or "
                "separate LoRA copies (share_teacher_base: false) under FSDP."
            )
        if self.fsdp and not accelerator.is_fsdp2:
            raise NotImplementedError(
                "FSDP1 is not supported: the trainer shards each trainable network as its own FSDP2 module "
                "(fully_shard). Set fsdp_version: 2 in the accelerate config (training/accelerate/fsdp.yaml)."
            )

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay, eps=oc.eps)

        self.module = _TrainModule(objective, generator)
        gen_opt = adamw(gen_params, oc.generator_lr)
        aux_opts = [adamw(params, oc.aux_lr) for params in aux_groups.values()]
        if self.fsdp:
            gen_params, aux_groups = self._prepare_sharded(generator, gen_opt, aux_groups, aux_opts)
        else:
            prepared = accelerator.prepare(self.module, gen_opt, *aux_opts)
            self.model = prepared[0]
            self.gen_opt = prepared[1]
            self.aux_opts = dict(zip(aux_groups, prepared[2:]))
        self.gen_params = gen_params
        self.aux_groups = aux_groups
        self._all_params = gen_params + [p for ps in aux_groups.values() for p in ps]

        # EMA, step counter, checkpoint hooks (registration order is part of the checkpoint format)
        self.state = TrainState(flops=setup_flops)
        self.state.seconds = float(setup_seconds)
        self.counting_flops = tc.count_flops or tc.budget_flops is not None
        self._flop_meter = FlopMeter(enabled=self.counting_flops)
        if tc.ema_halflife_kimg is not None:
            self.ema = HalflifeEMA(gen_params, tc.ema_halflife_kimg, tc.ema_rampup_ratio,
                                   images_per_update=tc.batch_size * tc.grad_accum * accelerator.num_processes)
        else:
            self.ema = GeneratorEMA(gen_params, tc.ema_decay) if tc.ema_decay is not None else None
        attach_ema(generator, self.ema)
        accelerator.register_for_checkpointing(self.state)
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)
        for extra in objective.checkpoint_objects():  # e.g. LCM's target network: frozen, yet it moves
            accelerator.register_for_checkpointing(extra)
        self._hooks = TrainableStateHooks(accelerator, self.module)
        self.last_checkpoint: Path | None = None
        self._resumed_from: Path | None = None
        # generator evaluations (x₀ predictions, backward-simulation steps included) per update, for distill-cost
        self._generator_calls = 0
        self._calls_per_update: list[int] = []
        generator.register_forward_hook(self._count_generator_call)

    def _prepare_sharded(self, generator, gen_opt, aux_groups, aux_opts):
        """FSDP2: each trainable network prepared on its own with its own optimizer, generator first, then the
        auxiliary networks in ``auxiliary_parameters()`` order (accelerate's FSDP checkpoints pair optimizer *i* with
        model *i*). ``fully_shard`` replaces the parameters by sharded ones (DTensors) and accelerate moves the
        optimizers onto them, so the parameter lists are read again afterwards."""
        acc = self.accelerator
        plugin = acc.state.fsdp_plugin
        wanted = plugin.transformer_cls_names_to_wrap
        wanted = list(wanted) if wanted is not None else None
        modules = owning_modules(self.objective, aux_groups)
        wrap_classes_present(plugin, generator, wanted)
        self.model, self.gen_opt = acc.prepare(generator, gen_opt)
        self.aux_opts = {}
        for (name, module), opt in zip(modules.items(), aux_opts):
            wrap_classes_present(plugin, module, wanted)
            _, self.aux_opts[name] = acc.prepare(module, opt)
        self.sharded_models = {"generator": generator, **modules}
        gen_params = list(generator.trainable_parameters())
        groups = {name: [p for p in module.parameters() if p.requires_grad] for name, module in modules.items()}
        return gen_params, groups

    def _count_generator_call(self, module, args, output) -> None:
        self._generator_calls += 1

    # --- setup helpers ------------------------------------------------------------------------------------------------
    def _diffusers_models(self, include_teacher: bool) -> list[torch.nn.Module]:
        from diffusers import ModelMixin

        roots: list[torch.nn.Module] = [self.generator, self.objective]
        if include_teacher and isinstance(getattr(self.teacher, "unet", None), torch.nn.Module):
            roots.append(self.teacher.unet)
        roots += self._shared_bases()  # a student / fake score that is an adapter on the teacher's base trains it
        found, seen = [], set()
        for root in roots:
            for m in root.modules():
                if isinstance(m, ModelMixin) and id(m) not in seen:
                    seen.add(id(m))
                    found.append(m)
        return found

    def _shared_bases(self) -> list[torch.nn.Module]:
        """The bases that adapter views (:class:`~stepdistill.models.shared_base.AdapterView`) of the generator or the
        objective run on (not their submodules: the frozen base is the teacher's)."""
        bases: list[torch.nn.Module] = []
        for root in (self.generator, self.objective):
            for m in root.modules():
                if isinstance(m, AdapterView) and all(m.base is not b for b in bases):
                    bases.append(m.base)
        return bases

    def _configure_modules(self) -> None:
        tc = self.config.train
        if tc.gradient_checkpointing:
            enabled = 0
            # an objective that backpropagates through the frozen teacher UNet's input (SiD) checkpoints it too
            through_teacher = "unet" in self.requirements.teacher_in_gradient
            shared = self._shared_bases()
            for m in self._diffusers_models(include_teacher=through_teacher):
                if getattr(m, "_supports_gradient_checkpointing", False):
                    # a shared base recomputes each block with the adapter that was active in its forward
                    shared_base = any(m is b for b in shared)
                    m.enable_gradient_checkpointing(adapter_checkpointing(m) if shared_base else None)
                    enabled += 1
            if not enabled:
                logger.warning("train.gradient_checkpointing is on but no model supports it")
        if tc.attention == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise RuntimeError(
                    "train.attention is 'xformers' but the xformers package is not installed. Install it "
                    "(pip install 'stepdistill[xformers]', matching your torch build) or use attention: sdpa "
                    "(PyTorch scaled_dot_product_attention, the default)."
                )
            for m in self._diffusers_models(include_teacher=True):
                if hasattr(m, "enable_xformers_memory_efficient_attention"):
                    m.enable_xformers_memory_efficient_attention()

    # --- batches ------------------------------------------------------------------------------------------------------
    def make_batch(self, step: int, turn: str, update: int, micro: int):
        """The batch of micro-batch ``micro`` of update ``update`` of ``turn`` at (0-based) ``step``; its prompts,
        noise and real latents come from a ``torch.Generator`` seeded by that position (and the process index)."""
        tc = self.config.train
        g = torch.Generator().manual_seed(
            batch_seed(tc.seed, step, TURNS[turn], update, micro, self.accelerator.process_index)
        )
        n = tc.batch_size
        prompts = self.sample_prompts(n, g)
        noise = torch.randn((n, *tuple(self.teacher.latent_shape)), generator=g)
        real, real_prompts = None, None
        if self.real_latent_source is not None:
            real = self.real_latent_source(n, g)
            if isinstance(real, (tuple, list)):  # (latents, their prompts)
                real, real_prompts = real
        kwargs = {"real_prompts": real_prompts} if real_prompts is not None else {}
        return self.batch_fn(self.teacher, prompts, noise, real_latents=real, device=self.accelerator.device, rng=g,
                             **kwargs)

    # --- one update ---------------------------------------------------------------------------------------------------
    def _zero_grads(self) -> None:
        for p in self._all_params:
            p.grad = None

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = not bool(torch.isfinite(value.detach()).all())
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if bad else 0.0], device=self.accelerator.device)
            bad = float(self.accelerator.reduce(flag, reduction="sum").item()) > 0
        if bad:
            v = value.detach().float().reshape(-1)
            raise TrainingDiverged(
                self.state.step + 1, what, float(v[0]) if v.numel() else float("nan"),
                str(self.last_checkpoint or latest_checkpoint(self.ckpt_dir) or "") or None,
            )

    def _clip_and_step(self, opts: dict, groups: dict, logs: dict) -> None:
        """Clip each parameter group and step its optimizer.

        fp16: accelerate's ``clip_grad_norm_`` unscales *every* optimizer and each ``AcceleratedOptimizer.step`` calls
        ``scaler.update()``, which with several optimizers in one update (e.g. fake score + discriminator) would
        unscale the later ones twice; so the turn's optimizers are unscaled once, stepped through the scaler and the
        scale is updated once."""
        acc = self.accelerator
        clip = self.config.train.grad_clip
        scaler = getattr(acc, "scaler", None) if self.config.train.mixed_precision == "fp16" else None
        if scaler is not None:
            for opt in opts.values():
                scaler.unscale_(opt.optimizer)
        clip_values = self.objective.grad_clip_values()
        for name, params in groups.items():
            if name in clip_values:  # the objective's clip-by-value (e.g. SiDA's fake score), before the norm clip
                torch.nn.utils.clip_grad_value_(params, clip_values[name])
            if clip is None:
                continue
            if scaler is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
            elif self.fsdp:  # DTensor gradients; the norm of the whole group, the same on every process
                norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))
            else:
                norm = acc.clip_grad_norm_(params, clip)
            if norm is None:  # DeepSpeed clips inside its engine
                continue
            norm = torch.as_tensor(norm)
            if scaler is None:  # fp16: inf gradients are expected now and then; the scaler skips those steps
                self._check_finite(norm, f"the gradient norm of {name}")
            logs[f"grad_norm/{name}"] = logs.get(f"grad_norm/{name}", 0.0) + float(norm)
        if scaler is not None:
            for opt in opts.values():
                scaler.step(opt.optimizer)
            scaler.update()
        else:
            for opt in opts.values():
                opt.step()

    def _update(self, turn: str, update: int) -> tuple[float, dict[str, float]]:
        acc = self.accelerator
        tc = self.config.train
        if turn == "generator":
            opts = {"generator": self.gen_opt}
            groups = {"generator": self.gen_params}
        else:
            opts = self.aux_opts
            groups = self.aux_groups
        self._zero_grads()
        losses, logs_sum = [], {}
        for micro in range(tc.grad_accum):
            batch = self.make_batch(self.state.step, turn, update, micro)
            with acc.accumulate(*self._accumulated()):
                phase = self._activation_phase(turn, micro)
                if phase is None:
                    with self._flop_meter:
                        loss, logs = self._loss(batch, turn)
                else:
                    with SavedTensorBytes(self._frozen_and_trained_modules()) as saved, self._flop_meter:
                        loss, logs = self._loss(batch, turn)
                    self.saved_activation_bytes[phase] = saved.bytes
                self._check_finite(loss, f"the {turn} loss" if turn == "generator" else "the auxiliary loss")
                with self._flop_meter:
                    acc.backward(loss)
                if acc.sync_gradients:
                    self._clip_and_step(opts, groups, logs_sum)
            losses.append(float(loss.detach()))
            for k, v in (logs or {}).items():
                if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
        self._zero_grads()
        n = tc.grad_accum
        logs = {k: (v if k.startswith("grad_norm/") else v / n) for k, v in logs_sum.items()}
        return sum(losses) / len(losses), logs

    def _loss(self, batch, turn: str):
        """One of the two losses: through the prepared module's forward (DDP), or, under FSDP, the objective's
        method directly (each sharded network gathers its weights in its own forward)."""
        if not self.fsdp:
            return self.model(batch, turn)
        if turn == "generator":
            return self.objective.generator_loss(batch)
        return self.objective.auxiliary_loss(batch)

    def _accumulated(self) -> tuple[torch.nn.Module, ...]:
        return tuple(self.sharded_models.values()) if self.fsdp else (self.model,)

    def _activation_phase(self, turn: str, micro: int) -> str | None:
        """The phase ("ode_warmup" or "main") whose generator step is to be measured now, or None: the first
        micro-batch of the first generator update of each phase is measured (see :mod:`.activations`)."""
        if turn != "generator" or micro != 0 or self.fsdp:  # FSDP: gathered weights would count as activations
            return None
        phase = "ode_warmup" if self.plan.ode_warmup else "main"
        return None if phase in self.saved_activation_bytes else phase

    def _frozen_and_trained_modules(self) -> list[torch.nn.Module]:
        teacher_modules = [m for m in vars(self.teacher).values() if isinstance(m, torch.nn.Module)]
        return [self.objective, *teacher_modules]

    def _set_generator_lr(self) -> None:
        """``optimizer.warmup_generator_lr`` while the objective is in its ODE-pair warm-up, else ``generator_lr``
        (set before every update, so a resumed run gets the right one)."""
        oc = self.config.optimizer
        lr = oc.warmup_generator_lr if oc.warmup_generator_lr is not None and self.plan.ode_warmup else oc.generator_lr
        for group in self.gen_opt.param_groups:
            group["lr"] = lr

    # --- checkpoints --------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        meta = {
            "objective": self.objective.name,
            "config": self.config.to_dict(),
            **self.run_identity,
        }
        if self.counting_flops:
            meta["training_flops"] = self.state.flops
        marked = [m["checkpoint"] for m in self.state.marks.values()]
        self.last_checkpoint = save_checkpoint(
            self.accelerator, self.ckpt_dir, self.state.step, self.config.train.keep_checkpoints, meta, protect=marked
        )
        self._checkpoint_clock = time.monotonic()
        return self.last_checkpoint

    def _checkpoint_due_by_time(self) -> bool:
        """``train.checkpoint_minutes`` have passed since the last checkpoint (or the loop's start); one decision for
        all processes (the main process's clock), since saving is collective."""
        minutes = self.config.train.checkpoint_minutes
        if not minutes:
            return False
        due = time.monotonic() - self._checkpoint_clock >= 60.0 * minutes
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if due and self.accelerator.is_main_process else 0.0],
                                device=self.accelerator.device)
            due = float(self.accelerator.reduce(flag, reduction="sum").item()) > 0
        return due

    def _stop_on_request(self, signum: int | None) -> None:
        """End the loop after this update on a Ctrl-C or SIGTERM: keep a checkpoint of it (when the run keeps
        checkpoints) and raise ``KeyboardInterrupt``; a rerun with ``resume="latest"`` goes on from it."""
        tc = self.config.train
        if tc.checkpoint_every or tc.checkpoint_minutes:
            saved = self.last_checkpoint if self._saved_this_step() else self.save_checkpoint()
            where = f"checkpoint {saved} kept; resume goes on from it"
        else:
            where = "no checkpoint kept (train.checkpoint_every and train.checkpoint_minutes are off)"
        logger.warning("signal %s: training stopped after update %d; %s", signum, self.state.step, where)
        raise KeyboardInterrupt(f"signal {signum}: stopped after update {self.state.step}")

    def _saved_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == checkpoint_name(self.state.step)

    # --- the FLOP budget ----------------------------------------------------------------------------------------------
    def _count_update_flops(self, counted_before: int) -> int:
        """Add this update's FLOPs (this process's meter since ``counted_before``, summed over the processes) to the
        state; returns them."""
        flops = self._flop_meter.total - counted_before
        if self.accelerator.num_processes > 1:
            total = torch.tensor([float(flops)], device=self.accelerator.device, dtype=torch.float64)
            flops = int(self.accelerator.reduce(total, reduction="sum").item())
        self.state.flops += flops
        return flops

    def budget_spent(self) -> bool:
        """True once the counted FLOPs reach ``train.budget_flops`` (never without a budget)."""
        budget = self.config.train.budget_flops
        return budget is not None and self.state.flops >= budget

    def _reach_marks(self, final: bool = False) -> None:
        """Record and checkpoint each budget mark the count has just reached (``final``: the run's end, mark 1.0)."""
        tc = self.config.train
        if tc.budget_flops is None:
            return
        due = [m for m in tc.budget_marks if self.state.flops >= m * tc.budget_flops]
        if final:
            due.append(1.0)
        due = [m for m in due if _mark_key(m) not in self.state.marks]
        if not due:
            return
        for mark in due:
            self.state.marks[_mark_key(mark)] = {"fraction": mark, "step": self.state.step, "flops": self.state.flops,
                                                 "seconds": round(self.state.seconds, 2),
                                                 "checkpoint": checkpoint_name(self.state.step)}
        self.save_checkpoint()  # with the marks in its state (again, if this step was saved before them)
        self._write_marks()

    def _write_marks(self) -> None:
        if not self.accelerator.is_main_process:
            return
        tc = self.config.train
        info = {"budget_flops": tc.budget_flops, "budget_unit": "training FLOPs (torch.utils.flop_counter)",
                "marks": sorted(self.state.marks.values(), key=lambda m: m["fraction"])}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.log_dir / "budget_marks.json", json.dumps(info, indent=2))

    def load_checkpoint(self, resume: str | Path) -> Path | None:
        """Restore a checkpoint: ``"latest"`` (the newest complete one under ``out_dir/checkpoints``; None and a fresh
        start when there is none), the name of one of this run's checkpoints (``"step_000600"``) or a path (a
        checkpoint, checkpoints or run folder). Returns the folder used."""
        path = find_resume_checkpoint(self.ckpt_dir, resume)
        if path is None:
            logger.warning("resume='latest' but %s holds no complete checkpoint; starting from scratch", self.ckpt_dir)
            return None
        info = read_marker(path)
        saved = info.get("config") or {}
        mine = self.config.to_dict()
        for section, key in (("generator", "timesteps"), ("generator", "lora_rank"), ("train", "batch_size"),
                             ("train", "grad_accum"), ("train", "seed")):
            if saved.get(section, {}).get(key, mine[section][key]) != mine[section][key]:
                logger.warning("resuming from %s written with %s.%s=%r, now %r: the run will not replay exactly",
                               path, section, key, saved[section][key], mine[section][key])
        if info.get("num_processes", self.accelerator.num_processes) != self.accelerator.num_processes:
            logger.warning("resuming from %s written by %s processes with %s: RNG streams differ", path,
                           info.get("num_processes"), self.accelerator.num_processes)
        try:
            self.accelerator.load_state(str(path))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the folder
            raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e
        self.last_checkpoint = path
        self._resumed_from = path
        return path

    # --- sampling -----------------------------------------------------------------------------------------------------
    def _sample(self) -> None:
        if self.sample_fn is None or (not self.accelerator.is_main_process and not self.fsdp):
            return  # under FSDP every process runs the sharded generator; the main one writes
        step = self.state.step
        gen = self.generator
        was_training = gen.training
        device = self.accelerator.device
        devices = [device.index or 0] if device.type == "cuda" else []
        out = self.out_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        images = {}
        gen.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                images[""] = self.sample_fn(gen, step)
                if self.ema is not None:
                    with self.ema.applied():
                        images["_ema"] = self.sample_fn(gen, step)
        finally:
            gen.train(was_training)
        if not self.accelerator.is_main_process:
            return
        pnginfo = None
        if self.sample_prompt_list is not None:
            from PIL.PngImagePlugin import PngInfo

            pnginfo = PngInfo()
            pnginfo.add_text("prompts", "\n".join(self.sample_prompt_list))
            pnginfo.add_text("step", str(step))
            listing = "".join(f"{i + 1}. {p}\n" for i, p in enumerate(self.sample_prompt_list))
            write_text_atomic(out / "prompts.txt", "Sample grids, left to right (the same prompts and noise at "
                                                   f"every step):\n{listing}")
        for suffix, image in images.items():
            if image is None:
                continue
            image.save(out / f"{checkpoint_name(step)}{suffix}.png", pnginfo=pnginfo)
            try:
                tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
                tracker.add_image(f"samples{suffix or '/raw'}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            except Exception:  # noqa: BLE001 - image logging is best effort
                pass

    # --- the loop -----------------------------------------------------------------------------------------------------
    def train(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Run until ``train.max_steps`` generator updates; returns a summary dict. ``resume``: None (fresh),
        ``"latest"`` or a checkpoint path. A non-finite loss raises :class:`TrainingDiverged`."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        tc = self.config.train
        if resume is not None:
            self.load_checkpoint(resume)
        elif latest_checkpoint(self.ckpt_dir) is not None:
            logger.warning("%s already holds checkpoints but this run starts from scratch (resume=None); they will be "
                           "overwritten or pruned as this run saves its own", self.ckpt_dir)
        start_step = self.state.step
        device = acc.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        csv_log = None
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.out_dir / "run_config.yaml")
            csv_log = CSVLogger(self.log_dir / "metrics.csv", keep_until_step=start_step if self._resumed_from else None)
        acc.init_trackers("tensorboard", config=tensorboard_hparams(self.config))

        eta = PhaseETA(start_step, tc.max_steps, self.requirements.ode_warmup_steps,
                       self.requirements.warmup_cost_ratio)
        budget = tc.budget_flops
        start_flops = self.state.flops
        if budget is None:
            pbar = tqdm(total=tc.max_steps, initial=start_step, disable=not acc.is_local_main_process,
                        desc=f"distill[{self.objective.name}]", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        else:  # the bar follows the budget (per cent of it), the postfix the updates
            pbar = tqdm(total=100.0, initial=min(100.0, 100.0 * start_flops / budget),
                        disable=not acc.is_local_main_process, desc=f"distill[{self.objective.name}] budget",
                        dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
        t0 = time.perf_counter()
        self._checkpoint_clock = time.monotonic()  # train.checkpoint_minutes counts from here and each checkpoint
        last_log_t, last_log_step = t0, start_step
        last = {}
        # Ctrl-C or SIGTERM: stop after the current update with a checkpoint of it (a second one stops at once); one
        # process only, since several must save at the same step
        stop = StopRequest(enabled=acc.num_processes == 1).install()
        try:
            while self.state.step < tc.max_steps and not self.budget_spent():
                aux_loss, aux_logs = None, {}
                t_update = time.perf_counter()
                counted_before = self._flop_meter.total
                with self._flop_meter:  # an objective's own stage inside its plan (DisBack's recorded path) counts
                    self.plan = plan = self.objective.plan_update(self.state.step)
                finalise_experts(self.generator, self.ema, plan.final_experts)
                if plan.reset_auxiliary_optimizers:
                    for opt in self.aux_opts.values():  # fresh auxiliary networks start with fresh moments
                        opt.optimizer.state.clear()
                self._set_generator_lr()
                generator_first = plan.generator_first
                calls_before = self._generator_calls
                if generator_first:  # DMD2 / SwiftBrush order: the fake score then learns from this update's sample
                    gen_loss, gen_logs = self._update("generator", 0)
                    self.objective.after_generator_update()
                    if self.ema is not None:
                        self.ema.step()
                if self.aux_opts and plan.auxiliary:
                    vals = []
                    for j in range(self.aux_ratio):
                        loss, logs = self._update("aux", j)
                        vals.append(loss)
                        aux_logs = logs
                    aux_loss = sum(vals) / len(vals) if vals else None
                if not generator_first:
                    gen_loss, gen_logs = self._update("generator", 0)
                    self.objective.after_generator_update()
                    if self.ema is not None:
                        self.ema.step()
                if not plan.ode_warmup:
                    self._calls_per_update.append(self._generator_calls - calls_before)
                self.state.step += 1
                step = self.state.step
                update_flops = self._count_update_flops(counted_before) if self.counting_flops else 0
                self.state.seconds += time.perf_counter() - t_update
                eta.record(step - 1, time.perf_counter() - t_update)
                if budget is None:
                    post = {"ETA": eta.text(step), "gen": f"{gen_loss:.4g}"}
                else:
                    used = self.state.flops - start_flops
                    left = max(0.0, budget - self.state.flops)
                    seconds = (time.perf_counter() - t0) * left / used if used > 0 else math.nan
                    post = {"step": step, "used": format_flops(self.state.flops), "ETA": _clock(seconds),
                            "gen": f"{gen_loss:.4g}"}
                if aux_loss is not None:
                    post["aux"] = f"{aux_loss:.4g}"
                pbar.set_postfix(post, refresh=False)
                pbar.update(1 if budget is None else min(100.0 * update_flops / budget, 100.0 - pbar.n))

                last_update = step == tc.max_steps or self.budget_spent()
                if step % tc.log_every == 0 or last_update:
                    now = time.perf_counter()
                    vals = torch.tensor([gen_loss, aux_loss if aux_loss is not None else 0.0], device=device)
                    if acc.num_processes > 1:
                        vals = acc.reduce(vals, reduction="mean")
                    row: dict[str, Any] = {"step": step, "time_s": round(now - t0, 4),
                                           "steps_per_s": (step - last_log_step) / max(now - last_log_t, 1e-9),
                                           "loss/generator": float(vals[0]),
                                           "lr/generator": self.gen_opt.param_groups[0]["lr"]}
                    if aux_loss is not None:
                        row["loss/aux"] = float(vals[1])
                    if self.counting_flops:
                        row["training_flops"] = self.state.flops
                    row.update({f"gen/{k}": v for k, v in gen_logs.items() if not k.startswith("grad_norm/")})
                    row.update({k: v for k, v in gen_logs.items() if k.startswith("grad_norm/")})
                    row.update({f"aux/{k}": v for k, v in aux_logs.items() if not k.startswith("grad_norm/")})
                    row.update({k: v for k, v in aux_logs.items() if k.startswith("grad_norm/")})
                    last = row
                    last_log_t, last_log_step = now, step
                    if csv_log is not None:
                        csv_log.log(row)
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)

                if tc.sample_every and (step % tc.sample_every == 0 or last_update):
                    self._sample()  # and always the last step, so the grids end where the run ends
                self._reach_marks()
                by_count = bool(tc.checkpoint_every) and step % tc.checkpoint_every == 0
                if (by_count or self._checkpoint_due_by_time()) and not self._saved_this_step():
                    self.save_checkpoint()
                if stop.requested and not last_update:
                    self._stop_on_request(stop.signum)
            if budget is not None and self.budget_spent():
                self._reach_marks(final=True)  # the run's end: always kept, as mark 1.0
            if ((tc.checkpoint_every or tc.checkpoint_minutes) and self.state.step > start_step
                    and not self._saved_this_step()):
                self.save_checkpoint()  # the final state
            if stop.requested:  # it came during the last update: the run is complete and saved, the command stops
                raise KeyboardInterrupt(f"signal {stop.signum} after the last update")
        finally:
            stop.restore()
            pbar.close()
            acc.end_training()

        wall = time.perf_counter() - t0
        done = self.state.step - start_step
        peak, peak_source = peak_memory(device)
        pipe = getattr(self.teacher, "pipeline", None)
        teacher_modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)] if pipe else []
        state_bytes = training_state_bytes([*teacher_modules, self.generator, self.objective],
                                           [self.gen_opt, *self.aux_opts.values()])
        summary = {
            "steps": self.state.step,
            "start_step": start_step,
            "steps_this_run": done,
            "wall_time_s": wall,
            "steps_per_s": done / wall if wall > 0 else math.nan,
            "peak_memory_bytes": peak,
            "peak_memory_source": peak_source,
            "training_state_bytes": state_bytes,
            "generator_saved_activation_bytes": dict(self.saved_activation_bytes),
            "generator_forwards_per_update": (sum(self._calls_per_update) / len(self._calls_per_update)
                                              if self._calls_per_update else None),
            "aux_updates_per_generator_update": self.aux_ratio,
            "training_flops": self.state.flops if self.counting_flops else None,
            "training_flops_this_run": self.state.flops - start_flops if self.counting_flops else None,
            "budget_flops": budget,
            "budget_marks": sorted(self.state.marks.values(), key=lambda m: m["fraction"]),
            "device": str(device),
            "num_processes": acc.num_processes,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self._resumed_from) if self._resumed_from else None,
            "last_logs": last,
        }
        if acc.is_main_process:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.log_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary
