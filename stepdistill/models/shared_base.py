"""Several LoRA adapter sets on one frozen base network: the student and the fake score as adapters on the teacher's
own transformer (or UNet), so that a FLUX-sized run holds one 12B base instead of three.

An :class:`AdapterView` is one role: a module whose forward runs the shared base with its own adapter active, and
whose parameters (and state dict) are that adapter's weights only. Outside a view's forward the base runs with every
adapter disabled, so the teacher (``teacher.unet`` itself, its pipeline, regression pairs, evaluation) is the frozen
base whatever adapters it carries. The adapters are peft LoRA layers added with diffusers' ``add_adapter`` (as
diffusers' ``train_dreambooth_lora_*`` scripts add theirs), one ``adapter_name`` per role.

Two details of peft are handled here:

- peft's ``set_adapter`` / ``enable_adapters`` also set ``requires_grad`` (True on the active adapter, False on the
  others), and autograd drops the gradient of a leaf whose ``requires_grad`` is False when backward reaches it. Every
  switch therefore restores each view's own ``requires_grad`` (a view frozen with ``requires_grad_(False)`` stays
  frozen), so a loss whose graph holds two roles' forwards (SiD: the generator's and the fake score's) trains both.
- Gradient checkpointing recomputes blocks during backward, when another adapter (or none) is active: the base is
  checkpointed with :func:`adapter_checkpointing`, whose recomputation re-activates the adapter that was active when
  the block first ran (``torch.utils.checkpoint``'s ``context_fn``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from typing import Any, Iterator, Sequence

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

#: the views attached to each shared base, and the adapter active on it (None: all disabled)
_VIEWS: "weakref.WeakKeyDictionary[nn.Module, list[AdapterView]]" = weakref.WeakKeyDictionary()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def _tuner_layers(base: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def activate(base: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the only active adapter of ``base`` (None: every adapter disabled), then give every view
    of ``base`` back its own ``requires_grad``."""
    for layer in _tuner_layers(base):
        if adapter_name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(adapter_name)
    _ACTIVE[base] = adapter_name
    for view in _VIEWS.get(base, []):
        for p in view.parameters():
            p.requires_grad_(view.trainable)


@contextlib.contextmanager
def active(base: nn.Module, adapter_name: str | None) -> Iterator[None]:
    """Within the context ``adapter_name`` is active on ``base``; the previous state is restored afterwards."""
    previous = _ACTIVE.get(base)
    activate(base, adapter_name)
    try:
        yield
    finally:
        activate(base, previous)


def _checkpoint_contexts(base: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), active(base, _ACTIVE.get(base))


def adapter_checkpointing(base: nn.Module):
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` on a shared base: torch's
    non-reentrant checkpoint whose recomputation runs with the adapter that was active in the forward."""
    context_fn = functools.partial(_checkpoint_contexts, base)

    def checkpoint(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return checkpoint


class AdapterView(nn.Module):
    """One role (``adapter_name``) as a LoRA adapter of rank ``rank`` on the shared frozen ``base``.

    ``parameters()`` / ``state_dict()`` hold only this adapter's weights (registered here under names with ``.``
    replaced by ``__``; they are the same tensors the base's LoRA layers use). ``base`` is not a submodule: its frozen
    weights belong to whoever owns the base (the teacher). ``config`` and ``dtype`` are the base's."""

    def __init__(self, base: nn.Module, adapter_name: str, rank: int, alpha: float | None = None,
                 target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
        object.__setattr__(self, "base", base)  # not registered: the base is the teacher's
        self.adapter_name = adapter_name
        self.trainable = True
        peft_config = getattr(base, "peft_config", None) or {}
        if adapter_name in peft_config:
            raise ValueError(f"the shared base already has an adapter named {adapter_name!r}")
        base.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                    init_lora_weights=True, target_modules=list(target_modules)),
                         adapter_name=adapter_name)
        marker = f".{adapter_name}."
        self.adapter = nn.ParameterDict({name.replace(".", "__"): p for name, p in base.named_parameters()
                                         if marker in name and "lora_" in name})
        if not len(self.adapter):
            raise ValueError(f"adding adapter {adapter_name!r} matched no module of {type(base).__name__} "
                             f"(target_modules {list(target_modules)})")
        for p in self.adapter.values():  # adapters train in float32 even on a half-precision base
            p.data = p.data.float()
        _VIEWS.setdefault(base, []).append(self)
        activate(base, None)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def requires_grad_(self, requires_grad: bool = True) -> "AdapterView":
        self.trainable = bool(requires_grad)
        return super().requires_grad_(requires_grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with active(self.base, self.adapter_name):
            return self.base(*args, **kwargs)

    def standalone(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A deep copy of the base carrying only this adapter, active (for export: merge it, or save its LoRA)."""
        previous = _ACTIVE.get(self.base)
        copy_ = copy.deepcopy(self.base)
        for name in list(getattr(copy_, "peft_config", {})):
            if name != self.adapter_name:
                copy_.delete_adapters(name)
        for layer in _tuner_layers(copy_):
            layer.enable_adapters(True)
            layer.set_adapter(self.adapter_name)
        activate(self.base, previous)
        return copy_.to(dtype=dtype) if dtype is not None else copy_
