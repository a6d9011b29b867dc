"""Checkpoint validation before the first token: what the model needs vs what the files hold.

The model mlx-lm builds from config.json (lazily, before any weight is read) knows the name,
shape and dtype of every parameter; the safetensors headers know what each file holds. Both are
compared here, headers only, so a wrong or incomplete checkpoint fails at open with one message
naming the file, the tensor and what was expected, never with mlx-lm's raw ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from flashmoe.errors import CheckpointError
from flashmoe.checkpoints.safetensors_index import CheckpointIndex, short

DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3",
    "F8_E5M2": "float8_e5m2",
}
# a float parameter may be stored in any of these; mlx-lm casts at load
FLOATS = ("float16", "bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A parameter's shape and dtype name ("uint32", "bfloat16", ...)."""

    shape: tuple[int, ...]
    dtype: str


def spec_of(array: mx.array) -> ParamSpec:
    """Shape and dtype of a (possibly lazy, unevaluated) array: nothing is read or computed."""
    return ParamSpec(tuple(array.shape), str(array.dtype).rpartition(".")[2])


def expected_params(model: nn.Module) -> dict[str, ParamSpec]:
    """Every parameter the built (and quantized) model will ask load_weights for."""
    return {name: spec_of(a) for name, a in tree_flatten(model.parameters())}


def index_params(index: CheckpointIndex) -> dict[str, ParamSpec]:
    return {n: ParamSpec(t.shape, DTYPE_NAMES[t.dtype]) for n, t in index.tensors.items()}


def check_moe_config(config: dict, num_experts: Callable[[dict], int],
                     experts_per_token: Callable[[dict], int], where: str) -> None:
    """The config's expert counts exist and make sense (the family knows where they live)."""
    try:
        n, k = num_experts(config), experts_per_token(config)
    except (KeyError, TypeError, ValueError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{where}: cannot read the expert counts ({short(key)} missing or "
                              "not an integer); a mixture-of-experts config names its number of "
                              "experts and experts per token") from None
    if n < 1 or not 1 <= k <= n:
        raise CheckpointError(f"{where}: {k} experts per token out of {n} experts; expected "
                              "at least one expert and between 1 and that many per token")


def check_quantized(index: CheckpointIndex) -> None:
    """Each quantized linear is a packed uint32 weight with matching scales (and biases)."""
    tensors = index.tensors
    for name in sorted(tensors):
        base, _, field = name.rpartition(".")
        t = tensors[name]
        if field == "weight" and t.dtype == "U32" and f"{base}.scales" not in tensors:
            raise CheckpointError(f"{t.file}: tensor {name} is packed (U32) but {base}.scales is "
                                  "in no file; a quantized weight needs its scales")
        if field != "scales":
            continue
        w, b = tensors.get(f"{base}.weight"), tensors.get(f"{base}.biases")
        if w is None:
            raise CheckpointError(f"{t.file}: tensor {name} has no {base}.weight in any file; "
                                  "the checkpoint is incomplete")
        if w.dtype != "U32" or w.shape[:-1] != t.shape[:-1] or not w.shape:
            raise CheckpointError(
                f"{w.file}: tensor {base}.weight is {w.dtype}{list(w.shape)} beside scales "
                f"{t.dtype}{list(t.shape)}; a quantized weight is U32 with the same leading "
                "dimensions as its scales")
        if b is not None and b.shape != t.shape:
            raise CheckpointError(f"{b.file}: tensor {base}.biases has shape {list(b.shape)} but "
                                  f"its scales have {list(t.shape)}; they must match")


def validate_checkpoint(index: CheckpointIndex, expected: Mapping[str, ParamSpec],
                        provided: Mapping[str, ParamSpec] | None = None) -> None:
    """Raise CheckpointError on the first tensor the model needs that the files lack or get wrong.

    `provided` is what load_weights would receive (mlx-lm's sanitize may rename); by default
    the index itself.
    """
    provided = index_params(index) if provided is None else provided
    names = sorted(expected)
    missing = [n for n in names if n not in provided]
    if missing:
        want = expected[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{index.root}: tensor {missing[0]}{more} is in none of {_files(index)}; "
            f"{_model(index)} needs it as {want.dtype}{list(want.shape)}; the checkpoint is "
            "incomplete or its config.json describes another model")
    for name in names:
        _check_one(index, name, expected[name], provided[name])
    extra = sorted(set(provided) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{_where(index, extra[0])}: tensor {extra[0]}{more} is not a parameter of "
            f"{_model(index)}; config.json (layers, sizes, quantization) does not match the "
            "weights")


def _check_one(index: CheckpointIndex, name: str, want: ParamSpec, got: ParamSpec) -> None:
    if got.shape != want.shape:
        raise CheckpointError(
            f"{_where(index, name)}: tensor {name} has shape {list(got.shape)} but {_model(index)} "
            f"needs {list(want.shape)}{_quant_hint(index, name)}")
    ok = got.dtype in FLOATS if want.dtype in FLOATS else got.dtype == want.dtype
    if not ok:
        expect = "a float dtype (" + ", ".join(FLOATS) + ")" if want.dtype in FLOATS else want.dtype
        raise CheckpointError(f"{_where(index, name)}: tensor {name} has dtype {got.dtype}; "
                              f"{_model(index)} needs {expect}{_quant_hint(index, name)}")


def _where(index: CheckpointIndex, name: str) -> str:
    t = index.tensors.get(name)
    return str(t.file) if t is not None else str(index.root)


def _files(index: CheckpointIndex) -> str:
    files = sorted({t.file.name for t in index.tensors.values()})
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def _model(index: CheckpointIndex) -> str:
    return f"{index.config.get('model_type')} as config.json describes it"


def _quant_hint(index: CheckpointIndex, name: str) -> str:
    """The config's quantization, when the tensor belongs to a quantized layer."""
    q = index.config.get("quantization")
    if not isinstance(q, dict) or f"{name.rpartition('.')[0]}.scales" not in index.tensors:
        return ""
    return f" (config.json quantization: bits={q.get('bits')}, group_size={q.get('group_size')})"


def checked_classes(index: CheckpointIndex,
                    get_classes: Callable[[dict], tuple[type, type]] | None = None
                    ) -> Callable[[dict], tuple[type, type]]:
    """mlx-lm's `get_model_classes` hook: the model class, validating before load_weights.

    mlx-lm calls load_weights after building and quantizing the model and sanitizing the
    weights, which is exactly when both sides of the comparison are known.
    """
    if get_classes is None:
        from mlx_lm.utils import _get_classes as get_classes

    def classes(config: dict) -> tuple[type, type]:
        model_cls, args_cls = get_classes(config)

        def load_weights(self: nn.Module, weights: Sequence[tuple[str, Any]],
                         strict: bool = True) -> nn.Module:
            provided = {k: spec_of(v) for k, v in weights if isinstance(v, mx.array)}
            validate_checkpoint(index, expected_params(self), provided)
            return model_cls.load_weights(self, weights, strict)

        return type(model_cls.__name__, (model_cls,), {"load_weights": load_weights}), args_cls

    return classes
