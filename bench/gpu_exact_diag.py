"""Where do flashmoe's GPU tokens leave mlx-lm's? (diagnostic for the GPU-exactness issue)

usage: python bench/gpu_exact_diag.py OUTDIR [--check]
Builds tiny checkpoints of the five families and a small shape-faithful Qwen3.5 (64 experts),
runs flashmoe on the default device (the GPU on a CUDA build) under settings that rewrite
slots (cache=none, a tiny LRU) and one that does not, and compares prompt logits (every
position) and 32 greedy tokens with resident mlx-lm on the same device. --check also compares,
after every fetch, the slot bytes as a GPU kernel reads them with the checkpoint's bytes.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe.engine import Engine, EngineOptions  # noqa: E402
from flashmoe.stages.expert_fetch import ExpertFetchStage  # noqa: E402
from tests.reference import expert_nbytes  # noqa: E402

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]
STEPS = 32
BAD: list[str] = []


def reference(path: Path, k: int | None):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(with_k(path, k) if k else path))
    logits = np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))
    toks = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=STEPS,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    return toks, logits


def with_k(path: Path, k: int) -> Path:
    """A symlinked copy whose config asks mlx-lm for k experts per token."""
    import json

    dst = path.parent / f"{path.name}-k{k}"
    dst.mkdir(exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            os.symlink(f, dst / f.name)
    cfg = json.loads((path / "config.json").read_text())
    (cfg.get("text_config") or cfg)["num_experts_per_tok"] = k
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def install_nosort() -> None:
    """Neither flashmoe nor mlx-lm takes gather_qmm's sorted-indices path."""
    import flashmoe.kernels.moe as kmoe
    from mlx_lm.models import switch_layers

    kmoe.SORT_MIN_PAIRS = 1 << 62

    def unsorted(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        y = self.down_proj(self.activation(self.up_proj(x, indices), self.gate_proj(x, indices)),
                           indices)
        return y.squeeze(-2)

    switch_layers.SwitchGLU.__call__ = unsorted


def install_check() -> None:
    """After each fetch: bytes a GPU kernel reads from each missed slot == the file's bytes."""
    orig = ExpertFetchStage.__call__

    async def checked(self, layer, experts, stats, *args, **kwargs):
        fetched = await orig(self, layer, experts, stats, *args, **kwargs)
        pool = self.pools[layer]
        for e, s in fetched.grant.misses:
            for part, rng in zip(self.store.layers[layer].parts, self.store.ranges(layer, e)):
                want = os.pread(self.store.fds[rng.file_id], rng.nbytes, rng.offset)
                arr = pool.store.arrays[part.key]
                got = await _gpu_bytes(arr, s)
                if got != want:
                    BAD.append(f"layer {layer} expert {e} slot {s} {part.key}")
        return fetched

    ExpertFetchStage.__call__ = checked


WORKER = None


async def _gpu_bytes(arr: mx.array, s: int) -> bytes:
    def read():
        out = mx.take(arr, mx.array([s]), axis=0)[0]
        out = mx.view(out, mx.uint8) ^ mx.array(0, dtype=mx.uint8)
        mx.eval(out)
        return np.array(out).tobytes()
    return await WORKER.build(read)


async def run(path: Path, **opts):
    global WORKER
    engine = await Engine.open(path, EngineOptions(device="gpu", **opts), tokenizer=False)
    WORKER = engine.worker
    try:
        logits = await engine.logits(PROMPT)
        toks = [ev.token_id async for ev in engine.generate(PROMPT, STEPS)]
        toks2 = [ev.token_id async for ev in engine.generate(PROMPT, STEPS)]
    finally:
        await engine.aclose()
    return toks, logits, toks2


def fixtures(root: Path) -> list[tuple[str, Path]]:
    from flashmoe.synth.shaped import build_shaped
    from tests.fixtures.tiny import build_tiny

    out = []
    only = os.environ.get("DIAG_ONLY", "qwen3_5_moe,qwen3_next,qwen3_moe,mixtral,qwen2_moe,shaped")
    for fam in ("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "qwen2_moe"):
        if fam not in only:
            continue
        p = root / fam
        if not (p / "config.json").exists():
            build_tiny(p, fam)
        out.append((fam, p))
    if "shaped" not in only:
        return out
    p = root / "shaped4x64"
    if not (p / "config.json").exists():
        build_shaped(p, layers=4, num_experts=64, vocab_size=4096, progress=False)
    out.append(("shaped4x64", p))
    return out


async def main() -> int:
    root = Path(sys.argv[1])
    if "--check" in sys.argv:
        install_check()
    if "--nosort" in sys.argv:
        install_nosort()
    print("mlx", mx.__version__, "device", mx.default_device(), flush=True)
    rows = []
    for name, path in fixtures(root):
        ks = [None] if name != "shaped4x64" else [4, 10]
        for k in ks:
            ref_toks, ref_logits = reference(path, k)
            expert = expert_nbytes(path)[0]
            settings = {"none": dict(cache_policy="none"),
                        "lru_tiny": dict(cache_budget_gb=(2.5 * (k or 2)) * expert / 2**30),
                        "lru_all": dict(cache_budget_gb=8.0)}
            for sname, opts in settings.items():
                BAD.clear()
                toks, logits, toks2 = await run(path, experts_per_token=k, io_split=4,
                                                io_threads=8, **opts)
                d = float(np.abs(logits - ref_logits).max())
                first = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
                same = "equal" if toks == ref_toks else f"DIFFER at {first}"
                rows.append(f"{name} K={k} {sname}: tokens {same}"
                            f"; repeat equal {toks2 == toks}; max prompt-logit diff {d:.3g}"
                            f"; slot check failures {len(BAD)} {BAD[:2]}")
                print(rows[-1], flush=True)
    ok = all("tokens equal" in r and "repeat equal True" in r for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
