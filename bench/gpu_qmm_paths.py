"""Do gather_qmm's kernel paths agree on this device? (diagnostic for the GPU-exactness issue)

usage: python bench/gpu_qmm_paths.py
A SwitchGLU forward (mlx-lm's exact calls) at tiny and Qwen3.5-397B expert shapes, computed
on the default device with sorted indices (mlx-lm's path when rows*k >= 64) and unsorted,
with the expert stack permuted (the same experts in other slots, as a slot cache places them),
row by row, and on the CPU. Prints the largest difference of each against the CPU result.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort


def experts(e: int, d: int, i: int, bits: int, gs: int, dtype) -> dict:
    out = {}
    for name, (o, n) in {"gate": (i, d), "up": (i, d), "down": (d, i)}.items():
        w = mx.random.normal((e, o, n)) * (1.0 / n ** 0.5)
        q, s, b = mx.quantize(w, group_size=gs, bits=bits)
        out[name] = (q, s.astype(dtype), b.astype(dtype))
    mx.eval(out)
    return out


def glu(x, idx, ws, sort: bool, bits: int, gs: int):
    x = mx.expand_dims(x, (-2, -3))
    inv, i2 = None, idx
    if sort:
        x, i2, inv = _gather_sort(x, idx)

    def lin(v, n):
        q, s, b = ws[n]
        return mx.gather_qmm(v, q, s, b, rhs_indices=i2, transpose=True, group_size=gs,
                             bits=bits, sorted_indices=sort)

    y = lin(nn.silu(lin(x, "gate")) * lin(x, "up"), "down")
    if sort:
        y = _scatter_unsort(y, inv, idx.shape)
    return y.squeeze(-2).astype(mx.float32)


def case(label: str, e: int, d: int, i: int, k: int, rows: int, dtype, bits=4, gs=64) -> None:
    mx.random.seed(rows * 100 + k)
    ws = experts(e, d, i, bits, gs, dtype)
    x = (mx.random.normal((1, rows, d))).astype(dtype)
    rng = np.random.default_rng(rows + k)
    idx_np = np.stack([rng.choice(e, k, replace=False) for _ in range(rows)])[None].astype(np.uint32)
    idx = mx.array(idx_np)
    perm = rng.permutation(e)  # slot s holds expert perm[s]
    slot_of = np.argsort(perm).astype(np.uint32)
    ws_p = {n: tuple(mx.take(t, mx.array(perm), axis=0) for t in v) for n, v in ws.items()}
    idx_p = mx.array(slot_of[idx_np])
    with mx.stream(mx.cpu):
        ref = np.array(glu(x, idx, ws, False, bits, gs))
    res = {
        "sorted": glu(x, idx, ws, True, bits, gs),
        "unsorted": glu(x, idx, ws, False, bits, gs),
        "sorted_permuted_slots": glu(x, idx_p, ws_p, True, bits, gs),
        "unsorted_permuted_slots": glu(x, idx_p, ws_p, False, bits, gs),
        "row_by_row": mx.concatenate([glu(x[:, r:r + 1], idx[:, r:r + 1], ws, False, bits, gs)
                                      for r in range(rows)], axis=1),
    }
    scale = float(np.abs(ref).max())
    parts = []
    for name, y in res.items():
        y = np.array(y)
        bad = "NaN" if np.isnan(y).any() else f"{np.abs(y - ref).max() / scale:.2e}"
        parts.append(f"{name}={bad}")
    s, u = np.array(res["sorted"]), np.array(res["sorted_permuted_slots"])
    print(f"{label} rows={rows} k={k} pairs={rows * k}: rel diff vs CPU: {', '.join(parts)}; "
          f"sorted vs sorted-permuted identical: {np.array_equal(s, u)}", flush=True)


def main() -> None:
    print("mlx", mx.__version__, mx.default_device(), flush=True)
    for rows in (1, 12, 20):
        case("tiny f32", 16, 64, 64, 4, rows, mx.float32)
    for rows, k in ((1, 10), (12, 4), (12, 10), (20, 10)):
        case("397B-shape bf16", 64, 4096, 1024, k, rows, mx.bfloat16)


if __name__ == "__main__" and len(__import__("sys").argv) == 1:
    main()


def mlx_lm_nan_check(path: str) -> None:
    """mlx-lm resident on a tiny checkpoint: prompt logits on this device, sorted and not."""
    from mlx_lm import load
    from mlx_lm.models import switch_layers

    model, _ = load(path)
    prompt = mx.array([[5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8,
                        200, 61, 3]])
    with mx.stream(mx.cpu):
        ref = np.array(model(prompt).astype(mx.float32))
    got = np.array(model(prompt).astype(mx.float32))
    orig = switch_layers.SwitchGLU.__call__

    def unsorted(self, x, indices):  # mlx-lm's SwitchGLU with its sort threshold out of reach
        x = mx.expand_dims(x, (-2, -3))
        y = self.down_proj(self.activation(self.up_proj(x, indices), self.gate_proj(x, indices)),
                           indices)
        return y.squeeze(-2)

    switch_layers.SwitchGLU.__call__ = unsorted
    try:
        got_u = np.array(model(prompt).astype(mx.float32))
    finally:
        switch_layers.SwitchGLU.__call__ = orig
    scale = float(np.abs(ref).max())
    for name, y in (("mlx-lm as is", got), ("mlx-lm unsorted", got_u)):
        msg = "NaN" if np.isnan(y).any() else f"{np.abs(y - ref).max() / scale:.2e}"
        print(f"{path}: {name} on {mx.default_device()} vs CPU: rel diff {msg}", flush=True)


if __name__ == "__main__" and len(__import__("sys").argv) > 1 and __import__("sys").argv[1] != "--overflow":
    for p in __import__("sys").argv[1:]:
        mlx_lm_nan_check(p)


def overflow_check() -> None:
    """Same expert at low and high indices of a >2 GiB stack (a big slot pool): same output?"""
    e, n, d, gs = 4200, 1024, 4096, 64  # gate_proj of Qwen3.5-397B: 2 MiB of 4-bit weights
    w = mx.random.normal((1, n, d)) * (1.0 / d ** 0.5)
    q, s, b = mx.quantize(w, group_size=gs, bits=4)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    at = (3, 1023, 1025, 2100, 4095, 4097, 4190)
    big = [mx.zeros((e, *t.shape[1:]), dtype=t.dtype) for t in (q, s, b)]
    for i in at:
        for arr, t in zip(big, (q, s, b)):
            arr[i] = t[0]
    mx.eval(big)
    x = mx.random.normal((1, 12, 1, 1, d)).astype(mx.bfloat16)
    for rows in (1, 12):
        def out(i: int, rows: int = rows) -> np.ndarray:
            idx = mx.full((1, rows, 1), i, dtype=mx.uint32)
            y = mx.gather_qmm(x[:, :rows], *big, rhs_indices=idx, transpose=True,
                              group_size=gs, bits=4)
            return np.array(y.astype(mx.float32))

        outs = {i: out(i) for i in at}
        same = {i: bool(np.array_equal(outs[i], outs[at[0]])) for i in at}
        print(f"stack of {e} experts ({e * q.nbytes / 2**30:.1f} GiB weights), rows={rows}: "
              f"output equal to index {at[0]}'s at index: {same}", flush=True)


if __name__ == "__main__" and __import__("sys").argv[1:] == ["--overflow"]:
    overflow_check()
