"""What resident mlx-lm loses when each decode token is synchronised before the next is built.

mlx-lm's generate_step builds token t+1's graph from token t's (lazy) choice and starts it
before reading t back, so the host's graph building overlaps the device's work. flashmoe's
whole-token step (stages/speculate.py) cannot do that today: the step's routing is checked
on the host before the next token is built. This times, on one checkpoint and K, greedy:
  pipelined   mlx-lm's own generate_step
  synced      build, evaluate, read back, then build the next token
  per_layer   synced, plus an mx.async_eval of every decoder layer's output as it is built
              (what speculate.py does), to see what the per-layer evaluations cost.

    PYTHONPATH=. python bench/sync_cost.py CHECKPOINT [--k 4] [--tokens 32]
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn


def decode_synced(model: nn.Module, prompt: mx.array, tokens: int) -> tuple[list, float]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[:, -1]
    y = mx.argmax(logits, axis=-1)
    mx.eval(y)
    out, stamps = [int(y.item())], [time.perf_counter()]
    for _ in range(tokens - 1):
        logits = model(y[:, None], cache=cache)[:, -1]
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
        out.append(int(y.item()))
        stamps.append(time.perf_counter())
    return out, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def decode_pipelined(model: nn.Module, prompt: mx.array, tokens: int) -> tuple[list, float]:
    from mlx_lm.generate import generate_step

    out, stamps = [], []
    for tok, _ in generate_step(prompt, model, max_tokens=tokens,
                                sampler=lambda lp: mx.argmax(lp, axis=-1)):
        out.append(int(tok))
        stamps.append(time.perf_counter())
    return out, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


class EvalEachLayer:
    """Wraps a decoder layer: mx.async_eval of its output as soon as it is built."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, *a, **kw):
        y = self.layer(*a, **kw)
        mx.async_eval(y)
        return y

    def __getattr__(self, name: str):  # is_linear, self_attn, ... as the model reads them
        return getattr(self.layer, name)


def main() -> None:
    from mlx_lm import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from flashmoe.bench.baseline import _with_k

    model, _ = load(args.path, model_config=_with_k(args.path, args.k))  # as the bench's mlx-lm
    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    ks = {getattr(getattr(layer, "mlp", None), "top_k", None) for layer in inner.layers}
    assert ks <= {args.k, None}, f"routers built for {ks}, not K={args.k}"
    prompt = mx.array([5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150])
    plain = list(inner.layers)
    n = len(plain)
    decode_pipelined(model, prompt, args.tokens)  # warm-up (JIT, caches)
    ref, _ = decode_synced(model, prompt, args.tokens)
    rows = {"pipelined": [], "synced": [], "per_layer": []}
    for _ in range(args.repeats):
        toks, s = decode_pipelined(model, prompt, args.tokens)
        rows["pipelined"].append((s, True))  # prefills in other chunks: other rounding
        inner.layers = plain
        toks, s = decode_synced(model, prompt, args.tokens)
        rows["synced"].append((s, toks == ref))
        inner.layers = [EvalEachLayer(layer) for layer in plain]
        toks, s = decode_synced(model, prompt, args.tokens)
        rows["per_layer"].append((s, toks == ref))
        inner.layers = plain
    for name, runs in rows.items():
        med = sorted(s for s, _ in runs)[len(runs) // 2]
        print(f"{name:10s} {1e3 * med:8.3f} ms/token  {1e3 * med / n:6.3f} ms/layer "
              f"({n} layers, K={args.k})  {1 / med:7.2f} tok/s  same tokens as synced: "
              f"{all(ok for _, ok in runs)}")


if __name__ == "__main__":
    main()
