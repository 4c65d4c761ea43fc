"""What autograd keeps for the backward pass: the bytes of the tensors saved by one forward (the activation memory
of a training step, apart from parameters, gradients and optimiser state).

Counted through :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor an autograd node saves passes through
the pack hook; storages are counted once (views of one storage share it) and the storages of the given parameters and
buffers are left out, so what remains is activations. This is the figure that separates objectives whose generator
step differentiates through frozen networks' inputs (SiD: generator, teacher and fake score activations are all kept)
from those that run the frozen networks under ``no_grad`` (DMD, DMD2: generator activations only).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensorBytes:
    """Context manager: ``with SavedTensorBytes(modules) as m: loss = f(x)`` then ``m.bytes`` is the number of bytes
    of the distinct storages autograd saved inside the block, excluding the parameters and buffers of ``modules``.

    The pack hook returns the tensor itself, so behaviour and results are unchanged and a saved storage stays alive
    (its address cannot be reused by another saved tensor) until backward."""

    def __init__(self, modules: Iterable[torch.nn.Module] = ()) -> None:
        self._excluded: set[int] = set()
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self._excluded.add(tensor.untyped_storage().data_ptr())
        self._seen: dict[int, int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())
