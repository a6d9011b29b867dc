"""mlx-lm resident generation as the side-by-side baseline, in a child process.

A child gives mlx-lm its own peak RSS and lets it run under a memory limit (a memory
cgroup, which counts page cache too) without risking the parent.
Run directly: python -m flashmoe.bench.baseline PATH TOKENS DTYPE PROMPT_IDS_JSON K
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flashmoe.bench import cgroup as cgroups
from flashmoe.runtime.memory import peak_rss_gb


def run_baseline(path: Path, prompt: list[int], tokens: int, dtype: str | None, k: int,
                 limit_gb: float | None = None, timeout_s: float = 1800) -> dict:
    """{'tok_s', 'peak_rss_gb', 'token_ids', 'status', 'limit'}; status is 'ok', 'oom', 'error'
    or 'timeout'. token_ids: mlx-lm's greedy stream, which the bench's own stream must equal."""
    cmd = [sys.executable, "-m", "flashmoe.bench.baseline", str(path), str(tokens),
           dtype or "none", json.dumps(prompt), str(k)]
    cgroup, limit = cgroups.make(f"flashmoe-baseline-{os.getpid()}", limit_gb) if limit_gb \
        else (None, "none")
    if limit_gb and cgroup is None:  # unlimited, it would swap or be killed: do not run it
        return {"status": "refused", "limit": limit,
                "error": f"the checkpoint is larger than hardware.memory_gb={limit_gb} and this "
                         f"machine has no memory cgroup to hold mlx-lm to it ({limit}); the "
                         "mlx-lm baseline was not run"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                             preexec_fn=(lambda: cgroups.join(cgroup)) if cgroup else None)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit": limit}
    finally:
        if cgroup:
            cgroups.remove(cgroup)
    if out.returncode != 0:
        killed = out.returncode in (-9, 137)
        return {"status": "oom" if killed else "error", "limit": limit,
                "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(status="ok", limit=limit)
    return result


def _with_k(path: str, k: int) -> dict:
    """mlx-lm config overrides that build every router for k experts per token (a block's
    attribute alone misses routers that keep their own copy, e.g. deepseek_v3's gate.top_k)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if "text_config" in cfg:
        return {"text_config": {**cfg["text_config"], "num_experts_per_tok": k}}
    return {"num_experts_per_tok": k}


def load_resident(path: str, dtype: str | None, k: int):
    """mlx-lm's model of the checkpoint, resident, with k experts per token (and the engine's
    activation dtype)."""
    from mlx_lm import load

    from flashmoe.models.loader import widen_to_f32

    model, _ = load(path, model_config=_with_k(path, k))  # routers built for k
    if dtype == "float32":  # same activation dtype as flashmoe: upcast bf16/f16 params
        widen_to_f32(model)
    for layer in model.layers:  # the same experts per token as the engine
        for block in (getattr(layer, "mlp", None), getattr(layer, "block_sparse_moe", None)):
            for attr in ("top_k", "num_experts_per_tok"):
                if block is not None and hasattr(block, attr):
                    setattr(block, attr, k)
    return model


def _child(path: str, tokens: int, dtype: str, prompt: list[int], k: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model = load_resident(path, dtype, k)
    stamps, ids = [], []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=tokens,
                                 sampler=lambda lp: mx.argmax(lp, axis=-1)):
        stamps.append(time.perf_counter())
        ids.append(int(tok))
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"tok_s": (len(stamps) - 1) / decode if decode else 0.0,
            "peak_rss_gb": peak_rss_gb(), "tokens": len(stamps), "token_ids": ids}


if __name__ == "__main__":
    p, n, dt, ids, k = sys.argv[1:6]
    print(json.dumps(_child(p, int(n), dt, json.loads(ids), int(k))))
