"""Training FLOPs: the machine-independent budget the trainer counts (``train.count_flops``, ``train.budget_flops``).

The count is torch's own :class:`torch.utils.flop_counter.FlopCounterMode`: the floating-point operations of every
matrix product, convolution and attention call, forward and backward, computed from the tensors' shapes (a product of
an (m × k) by a (k × n) matrix counts 2·m·k·n: one multiply and one add per term). It depends on the computation only,
not on the machine, its speed or its load, so two runs of one recipe count the same on any hardware. What it leaves
out, by torch's design: element-wise work (normalisations, activations, the loss, optimizer and EMA arithmetic),
which is small beside the matrix products of a diffusion network. Gradient checkpointing's recomputed forwards are
counted, since they are done.

One addition: torch's table has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but none
for the CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, so attention would count
0 on CPU and its full cost on a GPU. :func:`flop_counter` registers torch's own attention formulas
(``sdpa_flop_count``, ``sdpa_backward_flop_count``) for the CPU kernel, which makes a CPU count equal a GPU count.

Counting costs time: every tensor operation passes through a Python dispatch mode (measured on the toy UNet, batch
32, forward and backward on one CPU thread: 0.74 s plain, 0.99 s counted). Runs count only when asked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``softmax(QKᵀ)V``: 2·b·h·s_q·s_k·d (QKᵀ) + 2·b·h·s_q·s_k·d_v (times V), torch's formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                                  **kwargs: Any) -> int:
    """FLOPs of the attention backward (the scores recomputed, then the gradients of V, the scores, Q and K): five
    products the size of one forward product, torch's formula."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: Formulas torch lacks, keyed by operator (see the module docstring).
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A :class:`FlopCounterMode` that prints nothing and also counts the CPU attention kernel. Use it as a context
    manager around the work to count, then read ``get_total_flops()``."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


class FlopMeter:
    """Adds up the FLOPs of the blocks run under it: ``with meter: ...`` any number of times; ``meter.total``.
    A disabled meter is a no-op context (the work runs uncounted and ``total`` stays 0)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = 0
        self._counter: FlopCounterMode | None = None

    def __enter__(self) -> "FlopMeter":
        if self.enabled:
            self._counter = flop_counter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(*exc)
            self.total += int(counter.get_total_flops())


def format_flops(flops: float) -> str:
    """``1.23e13`` -> ``"12.3 TFLOP"`` (SI prefixes up to P)."""
    value = float(flops)
    for unit in ("", "k", "M", "G", "T"):
        if abs(value) < 1000:
            return f"{value:.3g} {unit}FLOP"
        value /= 1000
    return f"{value:.3g} PFLOP"
