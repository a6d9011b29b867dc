"""Where a switch module's expert tensors are on disk, in every layout mlx-lm's sanitize takes.

mlx-lm builds the model with names like `language_model.model.layers.3.mlp.switch_mlp.
gate_proj.weight` ([E, ...] stacks). Checkpoints store them under that name, under another
prefix sanitize renames (`model.language_model.*`, bare `model.layers.*`), or unstacked, one
tensor per expert (`...block_sparse_moe.experts.E.w1.weight`, `...mlp.experts.E.gate_proj.
weight`), which sanitize stacks. flashmoe reads exactly the bytes mlx-lm would stack.
"""
from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

from flashmoe.errors import CheckpointError
from flashmoe.runtime.expert_store import LayerExperts, layer_experts
from flashmoe.checkpoints.safetensors_index import TensorInfo

PREFIXES = ("", "model.", "language_model.", "language_model.model.", "model.language_model.")
# per-expert names mlx-lm's sanitize functions stack into each switch projection
ALIASES = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"),
           "down_proj": ("down_proj", "w2"), "fc1": ("fc1",), "fc2": ("fc2",)}


def variants(path: str) -> list[str]:
    """`path` and the same module under each name prefix sanitize maps onto it."""
    i = path.find("layers.")
    core = path[i:] if i >= 0 else path
    out = [path] + [p + core for p in PREFIXES]
    return list(dict.fromkeys(out))


def switch_experts(tensors: dict[str, TensorInfo], path: str, switch: nn.Module,
                   layer: int, where: str) -> LayerExperts:
    """The layer's LayerExperts for the (still lazy) switch module mlx-lm built at `path`."""
    params = dict(tree_flatten(switch.parameters()))  # "gate_proj.weight" -> [E, ...]
    num_experts = next(iter(params.values())).shape[0]
    quant = []
    for name, child in switch.children().items():
        if not isinstance(child, nn.Module) or not hasattr(child, "weight"):
            continue
        if not hasattr(child, "bits"):
            raise CheckpointError(f"{where}: layer {layer}'s experts ({path}.{name}) are not "
                                  "quantized; flashmoe streams quantized experts (convert with "
                                  "mlx_lm.convert -q)")
        quant.append((name, int(child.bits), int(child.group_size),
                      str(getattr(child, "mode", "affine"))))
    sources = _stacked(tensors, path, params) or _unstacked(tensors, path, params, num_experts)
    if sources is None:
        first = next(iter(params))
        raise CheckpointError(
            f"{where}: layer {layer}'s experts are neither stacked ({path}.{first} under any of "
            f"the prefixes mlx-lm accepts) nor one tensor per expert (…experts.0.{first}); "
            "this checkpoint's expert layout is not one flashmoe can stream")
    return layer_experts(layer, num_experts, sources, tuple(quant))


def _stacked(tensors, path, params) -> dict[str, tuple[TensorInfo, ...]] | None:
    for v in variants(path):
        found = {rel: tensors.get(f"{v}.{rel}") for rel in params}
        if all(t is not None and t.shape == tuple(params[rel].shape)
               for rel, t in found.items()):
            return {rel: (t,) for rel, t in found.items()}
    return None


def _unstacked(tensors, path, params, num_experts) -> dict[str, tuple[TensorInfo, ...]] | None:
    block = path.rpartition(".")[0]
    for v in variants(block):
        out = {}
        for rel, arr in params.items():
            proj, _, field = rel.rpartition(".")
            out[rel] = _per_expert(tensors, v, proj, field, tuple(arr.shape), num_experts)
            if out[rel] is None:
                break
        else:
            return out
    return None


def _per_expert(tensors, block, proj, field, shape, num_experts) -> tuple[TensorInfo, ...] | None:
    for alias in ALIASES.get(proj, (proj,)):
        names = [f"{block}.experts.{e}.{alias}.{field}" for e in range(num_experts)]
        found = [tensors.get(n) for n in names]
        if all(t is not None and t.shape == shape[1:] for t in found):
            return tuple(found)
    return None
