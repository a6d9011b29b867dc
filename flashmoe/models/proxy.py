"""The proxy that stands where a block's SwitchGLU/SwitchMLP was, inside mlx-lm's own model.

The block's own router computes `indices` and calls the proxy with them, exactly as it would
call its SwitchGLU; the proxy hands (x, indices) to the step that serves the experts, which
returns a lazy output (the same switch module over slot arrays, its expert ids looked up in
a host-written expert -> slot table). Scoring, grouping, bias correction, shared experts and
clamps all stay mlx-lm's code, so such a family is exact by construction.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from flashmoe.errors import CheckpointError

Serve = Callable[["ExpertProxy", mx.array, mx.array], mx.array]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExpertProxy(nn.Module):
    """Holds the original switch module out of the parameter tree; its weights become slots."""

    def __init__(self, layer: int, switch: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "switch", switch)  # hidden: model.parameters() skips it
        object.__setattr__(self, "serve", None)
        object.__setattr__(self, "layer", layer)
        switch.update(tree_map(lambda _: mx.zeros((0,)), switch.parameters()))  # drop the stacks

    def bind(self, weights: dict[str, mx.array]) -> None:
        """Point the switch's weights at slot arrays [slots, ...] (shared, updated in place)."""
        self.switch.update(tree_unflatten(list(weights.items())))

    def set_serve(self, serve: Serve | None) -> None:
        object.__setattr__(self, "serve", serve)

    def __call__(self, x: mx.array, indices: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        assert self.serve is not None, "experts are served by a Pipeline step; none is bound"
        return self.serve(self, x, indices)

    def compute(self, x: mx.array, slots: mx.array) -> mx.array:
        """mlx-lm's own switch forward over slot ids instead of expert ids."""
        return self.switch(x, slots)


def find_switches(model: nn.Module) -> dict[int, tuple[str, nn.Module, str, nn.Module]]:
    """{layer: (switch path, parent block, attribute, switch)} for every routed-expert stack."""
    out: dict[int, tuple[str, nn.Module, str, nn.Module]] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, (SwitchGLU, SwitchMLP)):
            continue
        m = _LAYER.search(path)
        parent_path, _, attr = path.rpartition(".")
        if m is None or int(m.group(1)) in out:
            raise CheckpointError(f"routed experts at {path} are not one per decoder layer; "
                                  "flashmoe streams one expert stack per layer")
        out[int(m.group(1))] = (path, walk(model, parent_path), attr, mod)
    return dict(sorted(out.items()))


def walk(model: nn.Module, path: str) -> Any:
    """The object at a dotted module path (list items by index)."""
    obj: Any = model
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else getattr(obj, part)
    return obj
