"""The embedded demo model: Qwen3.5-MoE's layout at a size a laptop CPU runs in seconds.

Same writer, layer pattern (L, L, L, Full), quantization and tensor names as the 397B
checkpoint, scaled down so ~64 tokens take seconds on 2 CPU cores while every routed expert
is still a ~0.84 MB read from disk. bf16 scales like the real thing; the compute dtype is
the engine's decision.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from flashmoe.synth.shaped import TOKENIZER_VOCAB, Qwen35Dims, build_qwen35

DEMO_DIMS = Qwen35Dims(
    layers=4,
    hidden=1024,
    vocab_size=TOKENIZER_VOCAB,  # exactly the trained BPE: every id decodes
    num_heads=8,
    num_kv_heads=2,
    head_dim=256,  # kept real so partial RoPE (64 dims, mrope 11/11/10) matches
    linear_k_heads=4,
    linear_v_heads=16,
    linear_k_dim=128,
    linear_v_dim=128,
    num_experts=64,
    experts_per_token=4,
    moe_intermediate=512,
    shared_intermediate=512,
    max_position_embeddings=32768,
)
DEMO_BITS = 4


def build_demo(path: Path | str, *, dims: Qwen35Dims | None = None, progress: bool = True,
               seed: int = 0) -> Path:
    """Write the demo checkpoint (or a variant with other `dims`) into `path`."""
    return build_qwen35(path, dims or DEMO_DIMS, bits=DEMO_BITS, seed=seed,
                        progress=progress, label="demo qwen3_5_moe")


def demo_checkpoint(cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """The demo checkpoint from the flashmoe cache, built on first use (~230 MB)."""
    from flashmoe.synth.cache import cached_checkpoint

    dims = DEMO_DIMS
    params = {"dims": asdict(dims), "bits": DEMO_BITS, "seed": 0}
    return cached_checkpoint("demo", params,
                             lambda p: build_demo(p, dims=dims, progress=progress),
                             cache_dir=cache_dir)
