"""Which model dims make mlx-cuda give garbage logits? (issue 16's tiny-fixture finding)

On the H200 (mlx-cuda 0.32.4, 2026-12-01) mlx-lm itself gave 1e32 / NaN prompt logits for the
test suite's tiny fixtures (hidden 64, head_dim 16/32, f32 and bf16), while 4 and 13
shape-faithful Qwen3.5 layers (hidden 4096, head_dim 256) were right. This builds one small
checkpoint per (family, hidden, head_dim) and compares mlx-lm's GPU prompt logits with its CPU
logits for the same weights, so the first bad dim (and so the kernel to report upstream) shows.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_tiny_dims.py [--families qwen3_moe,mixtral]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.tiny import build_tiny  # noqa: E402 - the suite's own fixture builder

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]
DIMS = [(64, 16), (64, 32), (128, 32), (256, 64), (512, 64), (512, 128)]


def logits_on(device: mx.Device, path: Path) -> np.ndarray:
    from mlx_lm import load

    with mx.stream(device):
        model, _ = load(str(path))
        out = model(mx.array([PROMPT]))[0].astype(mx.float32)
        mx.eval(out)
    return np.array(out)


def overrides(family: str, hidden: int, head_dim: int) -> dict:
    dims = {"hidden_size": hidden, "intermediate_size": 2 * hidden}
    if family not in ("mixtral", "qwen2_moe"):  # there head_dim is hidden / heads
        dims["head_dim"] = head_dim
    else:
        dims["num_attention_heads"] = max(1, hidden // head_dim)
        dims["num_key_value_heads"] = max(1, hidden // head_dim // 2)
    if family != "mixtral":
        dims["moe_intermediate_size"] = hidden
    return dims


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="qwen3_moe,mixtral,qwen2_moe,qwen3_5_moe")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    if not mx.is_available(mx.gpu):
        print("no GPU backend in this MLX: nothing to compare", file=sys.stderr)
        return 2
    dtype = getattr(mx, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for hidden, head_dim in DIMS:
                path = build_tiny(Path(tmp) / f"{family}-{hidden}-{head_dim}", family,
                                  dtype=dtype, overrides=overrides(family, hidden, head_dim))
                cpu, gpu = logits_on(mx.cpu, path), logits_on(mx.gpu, path)
                gap = np.abs(cpu - gpu)
                bad_rows = [i for i in range(len(cpu)) if not np.isfinite(gpu[i]).all()
                            or gap[i].max() > 0.25 * (np.abs(cpu[i]).max() + 1)]
                print(f"{family:12s} hidden {hidden:4d} head_dim {head_dim:3d}: max |gpu-cpu| "
                      f"{np.nanmax(gap):.3g}, NaN {int(np.isnan(gpu).sum())}, bad positions "
                      f"{bad_rows or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
