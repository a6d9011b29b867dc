"""Read a llama-architecture GGUF with `mx.load` and hand out Hugging Face-layout tensors.

`mx.load` keeps GGUF's Q4_0 / Q4_1 / Q8_0 blocks packed: it returns MLX affine quantization
(group 32; 4 or 8 bits) as `.weight` (uint32) + `.scales` + `.biases` (float16). Dequantizing
with float32 scales reproduces the `gguf` package's own dequantization bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from flashmoe.errors import CheckpointError

GGUF_GROUP = 32  # every GGUF block format mx.load keeps packed has 32 weights per block

# GGUF tensor name (without "blk.{i}.") -> Hugging Face llama module path
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True, slots=True)
class Packed:
    """One linear weight as MLX affine quantization: [out, in*bits/32] + [out, in/group] x2."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    def rows(self, index: mx.array) -> Packed:
        """Select/permute output rows; exact, because groups run along the input dim."""
        return Packed(self.weight[index], self.scales[index], self.biases[index],
                      self.bits, self.group_size)

    def cols(self, start: int, stop: int) -> Packed:
        """Input columns [start, stop); exact when both are multiples of the group size."""
        assert start % self.group_size == 0 and stop % self.group_size == 0, (start, stop)
        per, g = 32 // self.bits, self.group_size
        return Packed(self.weight[..., start // per: stop // per],
                      self.scales[..., start // g: stop // g],
                      self.biases[..., start // g: stop // g], self.bits, self.group_size)

    def scaled(self, factor: float) -> Packed:
        """The weight times `factor` (scales and biases scale); exact for powers of two."""
        if factor == 1.0:
            return self
        power_of_two = math.frexp(abs(factor))[0] == 0.5
        dtype = self.scales.dtype if power_of_two else mx.float32  # fp16 would round others
        return Packed(self.weight, (self.scales.astype(mx.float32) * factor).astype(dtype),
                      (self.biases.astype(mx.float32) * factor).astype(dtype),
                      self.bits, self.group_size)

    def dequantize(self) -> mx.array:
        # float32 scales: fp16 arithmetic would round d*q+m (GGUF dequantizes in float32)
        return mx.dequantize(self.weight, self.scales.astype(mx.float32),
                             self.biases.astype(mx.float32),
                             group_size=self.group_size, bits=self.bits)


Tensor = Packed | mx.array


def read_gguf(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors of `path` under Hugging Face names (packed where GGUF was), and metadata."""
    raw, meta = mx.load(str(path), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise CheckpointError(
            f"{path}: general.architecture={meta.get('general.architecture')!r}; only 'llama' "
            "GGUF files (SmolLM2, Llama) can be converted."
        )
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        stem, kind = key.rsplit(".", 1)
        if kind != "weight":
            continue
        name = _hf_name(stem, path)
        if f"{stem}.scales" in raw:
            scales = raw[f"{stem}.scales"]
            bits = value.shape[-1] // scales.shape[-1]
            out[name] = Packed(value, scales, raw[f"{stem}.biases"], bits, GGUF_GROUP)
        else:
            out[f"{name}.weight" if name.endswith("norm") else name] = value
    return out, meta


def _hf_name(stem: str, path: Path) -> str:
    if stem in TOP_NAMES:
        return TOP_NAMES[stem]
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"{path}: tensor {stem!r} has no llama equivalent this converter knows.")


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's half split)."""
    rows = w.weight.shape[0] if isinstance(w, Packed) else w.shape[0]
    half = rows // n_heads // 2
    # GGUF row h*2*half + 2*i + j holds HF row h*2*half + j*half + i
    index = mx.arange(rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)
    inverse = mx.argsort(index)
    return w.rows(inverse) if isinstance(w, Packed) else w[inverse]


def to_float(w: Tensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    return (w.dequantize() if isinstance(w, Packed) else w).astype(dtype)


def llama_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face / mlx-lm llama config.json fields the GGUF metadata determines."""
    def get(key: str) -> Any:
        value = meta.get(f"llama.{key}")
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks llama.{key}, which the config needs.")
        return value.item()

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    if int(get("rope.dimension_count")) != hidden // heads:
        raise CheckpointError("GGUF llama.rope.dimension_count != head_dim: partial rotary "
                              "is not supported by this converter.")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv")),
        # stored as float32 (9.9999997e-06): print it back as the 1e-05 it was written as
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": float(get("rope.freq_base")),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "head_dim": hidden // heads,
    }
