"""Build the resident part of a checkpoint with mlx-lm, leaving the routed experts on disk."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from flashmoe.errors import CheckpointError
from flashmoe.models import Family, family_for
from flashmoe.models.layout import switch_experts
from flashmoe.models.proxy import ExpertProxy, find_switches
from flashmoe.runtime.expert_store import LayerExperts
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.checkpoints.validate import check_moe_config, check_quantized, checked_classes


class StreamedExperts(nn.Module):
    """Stands where mlx-lm's SwitchGLU was: no weights, only its activation."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation


@dataclass(slots=True)
class Resident:
    """The loaded model without expert weights, and where those experts live."""

    model: nn.Module
    config: dict
    family: Family
    experts: dict[int, LayerExperts]  # MoE layer index -> its expert tensors on disk
    num_experts: int
    experts_per_token: int
    proxies: dict[int, ExpertProxy] = field(default_factory=dict)  # MlxLmFamily: layer -> proxy


def widen_to_f32(model: nn.Module) -> None:
    """Upcast every bf16/f16 parameter to f32 (exact), as f32 activations need; the one place
    the engine, the mlx-lm baseline and the ppl reference all do it."""
    model.update(tree_map(lambda p: p.astype(mx.float32)
                          if p.dtype in (mx.bfloat16, mx.float16) else p, model.parameters()))


def load_resident(path: Path, index: CheckpointIndex, dtype: mx.Dtype | None = None,
                  evaluate: bool = True, k: int | None = None) -> Resident:
    """mlx_lm.utils.load_model(lazy) then drop the expert stacks before anything is read.

    Must run in the MLX thread. The lazy expert arrays are released unevaluated, so their
    bytes are never read; evaluating the rest reads only the non-expert tensors. `k`: an
    MlxLmFamily's own router picks k experts per token (its config, overridden).
    """
    from mlx_lm.utils import load_model

    family = family_for(index.config, str(path / "config.json"))
    # headers only, before mlx-lm sees the files: its own errors are raw and multi-line
    check_moe_config(index.config, family.num_experts, family.experts_per_token,
                     str(path / "config.json"))
    check_quantized(index)
    overrides = None
    if family.proxy and k and 1 <= k <= family.num_experts(index.config):
        overrides = family.with_k(index.config, k)  # out of range: Model says so
    try:
        model, config = load_model(Path(path), lazy=True, model_config=overrides,
                                   get_model_classes=checked_classes(index))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: mlx-lm cannot build this checkpoint ({first}); is it a "
                              "complete mlx-community checkpoint?") from None
    experts: dict[int, LayerExperts] = {}
    proxies = _proxied(model, index, experts, str(path)) if family.proxy else {}
    for i, layer in enumerate([] if family.proxy else family.layers(model)):
        block = family.moe_block(layer)
        if block is None:
            continue
        glu = block.switch_mlp
        experts[i] = switch_experts(index.tensors, family.expert_prefix(model, i), glu, i,
                                    str(path))
        block.switch_mlp = StreamedExperts(glu.activation)
    if dtype is not None and dtype == mx.float32:  # f32 activations: widen params once, not per call
        widen_to_f32(model)
    if evaluate:  # task=pack only needs where the experts live, not the resident weights
        mx.eval(model.parameters())
    return Resident(model, config, family, experts, family.num_experts(config),
                    family.experts_per_token(config), proxies)


def _proxied(model: nn.Module, index: CheckpointIndex, experts: dict[int, LayerExperts],
             where: str) -> dict[int, ExpertProxy]:
    """Each SwitchGLU/SwitchMLP replaced by an ExpertProxy; `experts` filled in."""
    switches = find_switches(model)
    if not switches:
        raise CheckpointError(f"{where}: mlx-lm built {type(model).__module__} without routed "
                              "experts (no SwitchGLU/SwitchMLP); nothing to stream")
    proxies = {}
    for i, (name, block, attr, switch) in switches.items():
        experts[i] = switch_experts(index.tensors, name, switch, i, where)
        proxies[i] = ExpertProxy(i, switch)
        setattr(block, attr, proxies[i])
    return proxies
