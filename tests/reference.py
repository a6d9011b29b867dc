"""Resident mlx-lm as the reference: greedy tokens and last-position logits."""
from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np


def mlx_lm_greedy(path: Path, prompt: list[int], n: int,
                  upcast: bool = False) -> tuple[list[int], np.ndarray]:
    """mlx-lm's own generate_step (greedy); returns tokens and the prompt's last logits.

    upcast: widen bf16/f16 params to f32 first (what flashmoe's hardware.dtype=float32 does)."""
    from mlx_lm import load

    from flashmoe.models.loader import widen_to_f32
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    if upcast:
        widen_to_f32(model)
    last = np.array(model(mx.array([prompt]))[0, -1].astype(mx.float32))
    toks = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    return toks, last


async def flashmoe_greedy(path: Path, prompt: list[int], n: int, **opts):
    """flashmoe's streaming engine on the same checkpoint."""
    from flashmoe.engine import Engine, EngineOptions

    opts.setdefault("device", os.environ.get("FLASHMOE_TEST_DEVICE", "cpu"))
    engine = await Engine.open(path, EngineOptions(**opts), tokenizer=False)
    try:
        last = (await engine.logits(prompt))[-1]
        toks = [ev.token_id async for ev in engine.generate(prompt, n)]
    finally:
        await engine.aclose()
    return toks, last, engine


def expert_nbytes(path: Path) -> tuple[int, int]:
    """Bytes of one routed expert in layer 0, and the checkpoint's experts per token."""
    import json

    from flashmoe.checkpoints.safetensors_index import CheckpointIndex

    cfg = json.loads((path / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    n = text.get("num_experts") or text.get("num_local_experts")
    layer0 = sum(t.nbytes for name, t in CheckpointIndex.open(path).tensors.items()
                 if ".layers.0." in name and (".switch_mlp." in name or ".experts." in name))
    return layer0 // n, int(text["num_experts_per_tok"])


def assert_same(ref, got) -> None:
    """Greedy tokens identical and last-position logits within the parity tolerance."""
    ref_toks, ref_last = ref
    toks, last = got[0], got[1]
    assert toks == ref_toks
    rel = np.abs(last - ref_last).max() / np.abs(ref_last).max()
    assert rel < 1e-3, f"last-position logits differ by {rel:.2e} relative"
