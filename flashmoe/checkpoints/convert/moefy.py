"""Split a dense SwiGLU MLP into a qwen2_moe block that computes the same function at K = E.

qwen2_moe computes  y = sum_{e in topK} softmax(r x)_e * expert_e(x) + sigmoid(s x) * shared(x)
with no renormalisation. The MLP's neurons are cut into contiguous slices: the first `shared`
go to the shared expert, the rest into E routed experts of `size` neurons each. Then
  * router r = tiny multiple of each expert's mean gate row: softmax(r x) = 1/E (1 +- <0.5 %),
    yet its order depends on the token, so K < E routes like a (weak, untrained) router;
  * routed down projections are multiplied by E (1/E * E = 1 at K = E);
  * shared_expert_gate s = 0, so sigmoid = 1/2, and the shared down projection is doubled.
At K = E the block equals the dense MLP up to that ripple (perplexity within 1e-4). Slices
start and end on GGUF's 32-neuron blocks, so 4-bit experts are GGUF's own Q4_1 bits (exact).
K < E drops neurons that were never trained to be optional: quality falls fast (see tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from flashmoe.errors import ConfigError
from flashmoe.checkpoints.convert.gguf_weights import GGUF_GROUP, Packed, Tensor, to_float

# Router logit spread (std over unit-variance inputs): small enough that softmax stays ~1/E,
# large enough that neighbouring experts differ by ~1e-5, far above float32 rounding.
ROUTER_STD = 1e-3
QUANT_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True, slots=True)
class MoeSpec:
    """How one MLP of `intermediate` neurons is cut; bits=0 keeps routed experts float32."""

    experts: int
    shared: int
    size: int
    bits: int
    group_size: int


def moe_spec(intermediate: int, experts: int, *, shared: int | None = None,
             bits: int = 4, group_size: int = GGUF_GROUP) -> MoeSpec:
    """Validate the cut; by default the shared expert takes the neurons left over once each
    routed expert has the largest multiple of the group size below intermediate / experts."""
    unit = math.lcm(GGUF_GROUP, group_size) if bits else GGUF_GROUP
    if not 1 <= experts <= (intermediate - 1) // unit:
        raise ConfigError(f"experts={experts} must be between 1 and {(intermediate - 1) // unit} "
                          f"(each expert needs a multiple of {unit} of the {intermediate} "
                          "neurons, and the shared expert some left over).")
    if shared is None:
        size = (intermediate // experts - 1) // unit * unit
        shared = intermediate - experts * size
    if not 0 < shared < intermediate or (intermediate - shared) % experts:
        raise ConfigError(f"shared_neurons={shared} must be in [1, {intermediate}) and leave a "
                          f"multiple of experts={experts} of the {intermediate} neurons.")
    size = (intermediate - shared) // experts
    if bits and (bits not in QUANT_BITS or size % group_size):
        raise ConfigError(f"expert_bits={bits}, expert_group_size={group_size}: bits must be "
                          f"one of {QUANT_BITS} (or 0 for float32 experts) and the group size "
                          f"must divide the {size} neurons of an expert.")
    return MoeSpec(experts, shared, size, bits, group_size)


def moe_config(spec: MoeSpec) -> dict[str, Any]:
    """The qwen2_moe config.json fields of the cut (num_experts_per_tok = E: exact)."""
    return {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": spec.experts,
        "num_experts_per_tok": spec.experts,
        "moe_intermediate_size": spec.size,
        "shared_expert_intermediate_size": spec.shared,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
    }


def _slice(t: Tensor, rows: tuple[int, int] | None, cols: tuple[int, int] | None,
           scale: float, packed: bool) -> Tensor:
    """Rows or columns [a, b) of `t` times `scale`; kept packed when `packed` and aligned."""
    if isinstance(t, Packed) and packed and (cols is None or cols[0] % t.group_size == 0
                                             and cols[1] % t.group_size == 0):
        t = t.rows(mx.arange(*rows)) if rows is not None else t
        return (t.cols(*cols) if cols is not None else t).scaled(scale)
    f = to_float(t)
    f = f[rows[0]: rows[1]] if rows is not None else f
    return (f[:, cols[0]: cols[1]] if cols is not None else f) * scale


def _stack(parts: list[Tensor], spec: MoeSpec) -> Tensor:
    """[E, out, in] experts: GGUF's packed blocks, requantized, or float32 (spec.bits=0)."""
    if all(isinstance(p, Packed) for p in parts):
        w, s, b = (mx.stack([getattr(p, k) for p in parts])
                   for k in ("weight", "scales", "biases"))
        return Packed(w, s, b, parts[0].bits, parts[0].group_size)
    w = mx.stack([to_float(p) for p in parts])  # [E, out, in]
    if not spec.bits:
        return w
    q, s, b = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    return Packed(q, s.astype(mx.float16), b.astype(mx.float16), spec.bits, spec.group_size)


def split_mlp(mlp: dict[str, Tensor], spec: MoeSpec, prefix: str, norm: mx.array,
              keep_quantized: bool) -> dict[str, Tensor]:
    """The qwen2_moe block's modules by path (packed or float32), from one dense MLP."""
    gate, up, down = mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]
    spans = [(spec.shared + e * spec.size, spec.shared + (e + 1) * spec.size)
             for e in range(spec.experts)]
    # experts keep GGUF's own blocks when asked for GGUF's own (bits, group)
    same = isinstance(down, Packed) and (down.bits, down.group_size) == (spec.bits,
                                                                         spec.group_size)
    sw = f"{prefix}.switch_mlp"
    gate_f = to_float(gate)
    router = mx.stack([gate_f[a:b].mean(axis=0) for a, b in spans])  # [E, D]
    spread = mx.linalg.norm(router * norm, axis=-1).mean()
    span = (0, spec.shared)
    return {
        f"{sw}.gate_proj": _stack([_slice(gate, s, None, 1.0, same) for s in spans], spec),
        f"{sw}.up_proj": _stack([_slice(up, s, None, 1.0, same) for s in spans], spec),
        f"{sw}.down_proj": _stack(
            [_slice(down, None, s, float(spec.experts), same) for s in spans], spec),
        f"{prefix}.gate": router * (ROUTER_STD / spread),
        f"{prefix}.shared_expert_gate": mx.zeros((1, gate_f.shape[1])),
        f"{prefix}.shared_expert.gate_proj": _slice(gate, span, None, 1.0, keep_quantized),
        f"{prefix}.shared_expert.up_proj": _slice(up, span, None, 1.0, keep_quantized),
        f"{prefix}.shared_expert.down_proj": _slice(down, None, span, 2.0, keep_quantized),
    }
