"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) helpers for the :class:`Trainer`.

What was measured with torch 2.13 (CPU wheel) and accelerate 1.15, two processes on the gloo backend:

- torch's FSDP2 works on CPU: ``fully_shard`` over gloo trains (all-gather, reduce-scatter), ``clip_grad_norm_``
  handles the DTensor gradients, and ``torch.distributed.checkpoint`` saves and reloads a sharded model and optimizer
  state exactly (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html,
  https://pytorch.org/docs/stable/distributed.checkpoint.html).
- accelerate does not switch to FSDP on CPU: ``AcceleratorState`` sets ``DistributedType.FSDP`` only for
  multi-accelerator types (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...). Under ``ACCELERATE_USE_CPU=1`` with an FSDP
  launch config it silently falls back to ``MULTI_CPU`` (DDP over gloo) and ignores the plugin. With the state set
  to FSDP by hand (:func:`enable_fsdp_on_cpu`), accelerate's own FSDP2 code (``prepare``, ``save_state`` /
  ``load_state`` with a sharded state dict) runs unchanged on CPU.
- accelerate's FSDP2 ``prepare`` takes one model per call (several optimizers are allowed), and its FSDP
  ``save_state`` / ``load_state`` pair optimizer *i* with model *i*; so the trainer prepares each trainable network
  on its own, with its own optimizer, in a fixed order (see the trainer's module docstring).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Turn an accelerator that accelerate left at ``MULTI_CPU`` although FSDP was requested into an FSDP one (the
    plugin read from the launcher's environment, ``FSDP_*`` variables). Returns whether it did. Nothing changes for
    a GPU launch, a DDP launch or a single process."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # both shared states: a later AcceleratorState() copies PartialState's fields over its own
    PartialState().distributed_type = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.warning("accelerate does not enable FSDP on CPU; stepdistill enabled it (FSDP%s over %s, %s processes)",
                   plugin.fsdp_version, torch.distributed.get_backend(), accelerator.num_processes)
    return True


def wrap_classes_present(plugin, module: torch.nn.Module, wanted: list[str] | None) -> None:
    """Restrict the plugin's ``transformer_cls_names_to_wrap`` to the classes ``module`` holds before it is prepared:
    accelerate raises when a named class is missing, and one launch config names the block classes of several
    families (FLUX's and SD3's) for networks that hold only some of them (or none: a small head)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    fn = plugin.auto_wrap_policy
    base = getattr(fn, "func", fn)
    if base is not transformer_auto_wrap_policy or wanted is None:
        return
    present = {type(m).__name__ for m in module.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in wanted if name in present]
    plugin.auto_wrap_policy = transformer_auto_wrap_policy  # re-resolved against this module


def owning_modules(objective: torch.nn.Module, groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.nn.Module]:
    """For each auxiliary parameter group, the submodule of ``objective`` that owns it: the one whose trainable
    parameters are exactly the group (DMD2's ``fake_unet`` for ``fake_score``, its ``cls_head`` for
    ``discriminator``). Each is sharded as its own FSDP module with the group's optimizer."""
    found: dict[str, torch.nn.Module] = {}
    for name, params in groups.items():
        ids = {id(p) for p in params}
        for _, module in objective.named_modules():
            if module is objective:
                continue
            mine = {id(p) for p in module.parameters() if p.requires_grad}
            if mine == ids:
                found[name] = module
                break
        else:
            raise NotImplementedError(
                f"FSDP needs each auxiliary parameter group in a module of its own; group {name!r} of "
                f"{type(objective).__name__} is not the trainable parameters of one submodule. Use DDP "
                "(training/accelerate/ddp.yaml)."
            )
    return found


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every process must call it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

