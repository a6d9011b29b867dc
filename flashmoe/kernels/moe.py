"""Routed-expert math over slot arrays: the same gather_qmm calls as mlx-lm's SwitchGLU.

Pure mx.array functions; the caller passes weights already laid out as [slots, ...].
"""
from __future__ import annotations

from typing import Callable, Mapping

import mlx.core as mx
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

Quant = Mapping[str, tuple[int, int, str]]  # proj -> (bits, group_size, mode)
SORT_MIN_PAIRS = 64  # mlx-lm SwitchGLU sorts (token, k) pairs by expert from this many on


def switch_linear(x: mx.array, w: Mapping[str, mx.array], proj: str, idx: mx.array,
                  quant: Quant, sorted_indices: bool) -> mx.array:
    """mlx-lm QuantizedSwitchLinear.__call__ with the expert stack replaced by slots."""
    bits, group_size, mode = quant[proj]
    return mx.gather_qmm(
        x, w[f"{proj}.weight"], w[f"{proj}.scales"], w.get(f"{proj}.biases"),
        rhs_indices=idx, transpose=True, group_size=group_size, bits=bits, mode=mode,
        sorted_indices=sorted_indices,
    )


def gather_experts(x: mx.array, slots: mx.array, w: Mapping[str, mx.array], quant: Quant,
                   activation: Callable[[mx.array, mx.array], mx.array]) -> mx.array:
    """SwitchGLU forward: x [..., D], slots [..., k] → [..., k, D] (mirrors mlx-lm exactly)."""
    x = mx.expand_dims(x, (-2, -3))
    do_sort = slots.size >= SORT_MIN_PAIRS
    idx, inv_order = slots, None
    if do_sort:
        x, idx, inv_order = _gather_sort(x, slots)
    x_up = switch_linear(x, w, "up_proj", idx, quant, do_sort)
    x_gate = switch_linear(x, w, "gate_proj", idx, quant, do_sort)
    x = switch_linear(activation(x_up, x_gate), w, "down_proj", idx, quant, do_sort)
    if do_sort:
        x = _scatter_unsort(x, inv_order, slots.shape)
    return x.squeeze(-2)


def scatter_pairs(y: mx.array | None, total: int, pairs: mx.array, values: mx.array) -> mx.array:
    """Write values [P, D] into rows `pairs` of a [total, D] buffer (pairs are (token, k))."""
    if y is None:
        y = mx.zeros((total, values.shape[-1]), dtype=values.dtype)
    y[pairs] = values
    return y
