"""Split a dense SwiGLU MLP into qwen2_moe experts that compute the same function at K = E."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from flashmoe.errors import ConfigError
from flashmoe.tools.gguf_weights import Packed, Tensor, to_float

ROUTER_EPS = 1e-4


@dataclass(frozen=True, slots=True)
class MoeSpec:
    experts: int
    intermediate: int
    bits: int
    group_size: int
    shared: int = 0

    def __post_init__(self) -> None:
        routed = self.intermediate - self.shared
        if self.experts < 1 or routed % self.experts:
            raise ConfigError(f"experts={self.experts} must divide the {routed} routed neurons.")
        if self.bits and (routed // self.experts) % self.group_size:
            raise ConfigError(f"expert size {routed // self.experts} not a multiple of group {self.group_size}")

    @property
    def size(self) -> int:
        return (self.intermediate - self.shared) // self.experts


def moe_config(spec: MoeSpec) -> dict[str, Any]:
    return {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": spec.experts,
        "num_experts_per_tok": spec.experts,
        "moe_intermediate_size": spec.size,
        "shared_expert_intermediate_size": max(spec.shared, 32),
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
    }


def _cols(p: Packed, start: int, stop: int) -> Packed:
    per = 32 // p.bits
    g = p.group_size
    return Packed(p.weight[:, start // per: stop // per], p.scales[:, start // g: stop // g],
                  p.biases[:, start // g: stop // g], p.bits, p.group_size)


def _quant(ws: list[mx.array], spec: MoeSpec) -> dict[str, mx.array]:
    w = mx.stack(ws)
    q, s, b = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    return {"weight": q, "scales": s.astype(mx.float16), "biases": b.astype(mx.float16)}


def moefy_layer(mlp: dict[str, Tensor], spec: MoeSpec, prefix: str) -> tuple[dict[str, mx.array], dict[str, dict[str, int]]]:
    E, c, S = spec.experts, spec.size, spec.shared
    gate, up, down = mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]
    out: dict[str, mx.array] = {}
    quantized: dict[str, dict[str, int]] = {}
    spans = [(S + e * c, S + (e + 1) * c) for e in range(E)]
    exact = isinstance(down, Packed) and (down.bits, down.group_size) == (spec.bits, spec.group_size)
    sw = f"{prefix}.switch_mlp"
    for name, t in (("gate_proj", gate), ("up_proj", up)):
        if exact:
            parts = [t.rows(mx.arange(a, b)) for a, b in spans]
            out[f"{sw}.{name}.weight"] = mx.stack([p.weight for p in parts])
            out[f"{sw}.{name}.scales"] = mx.stack([p.scales for p in parts])
            out[f"{sw}.{name}.biases"] = mx.stack([p.biases for p in parts])
        else:
            f = to_float(t)
            ws = [f[a:b] for a, b in spans]
            if spec.bits:
                for k, v in _quant(ws, spec).items():
                    out[f"{sw}.{name}.{k}"] = v
            else:
                out[f"{sw}.{name}.weight"] = mx.stack(ws)
    if exact:
        parts = [_cols(down, a, b) for a, b in spans]
        out[f"{sw}.down_proj.weight"] = mx.stack([p.weight for p in parts])
        out[f"{sw}.down_proj.scales"] = mx.stack([p.scales for p in parts]) * E
        out[f"{sw}.down_proj.biases"] = mx.stack([p.biases for p in parts]) * E
    else:
        f = to_float(down)
        ws = [f[:, a:b] * E for a, b in spans]
        if spec.bits:
            for k, v in _quant(ws, spec).items():
                out[f"{sw}.down_proj.{k}"] = v
        else:
            out[f"{sw}.down_proj.weight"] = mx.stack(ws)
    if spec.bits:
        for name in ("gate_proj", "up_proj", "down_proj"):
            quantized[f"{sw}.{name}"] = {"group_size": spec.group_size, "bits": spec.bits}
    g = to_float(gate)
    router = mx.stack([g[a:b].mean(axis=0) for a, b in spans])
    out[f"{prefix}.gate.weight"] = ROUTER_EPS * router
    se = f"{prefix}.shared_expert"
    d = to_float(down)
    hidden = g.shape[1]
    if S:
        out[f"{se}.gate_proj.weight"] = g[:S]
        out[f"{se}.up_proj.weight"] = to_float(up)[:S]
        out[f"{se}.down_proj.weight"] = d[:, :S] * 2
    else:
        out[f"{se}.gate_proj.weight"] = mx.zeros((32, hidden))
        out[f"{se}.up_proj.weight"] = mx.zeros((32, hidden))
        out[f"{se}.down_proj.weight"] = mx.zeros((hidden, 32))
    out[f"{se}_gate.weight"] = mx.zeros((1, hidden))
    return out, quantized
