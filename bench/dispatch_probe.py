"""Where resident mlx-lm's host time goes per decode token, on the thread flashmoe would use.

    PYTHONPATH=. python bench/dispatch_probe.py MODEL_PATH [--tokens 32] [--k 4] [--rounds 3] \
        [--dtype float32]

mlx-lm's own decode loop (generate_step's pipelining: token t+1 built and started before t is
read back), greedy, on the checkpoint loaded resident, timed per layer: wall, CPU time inside
mx.async_eval (MLX encoding the graph's kernels) and the thread's other CPU time (Python
building the graph). Run on the main thread, on a persistent worker thread that set its own
default device (as flashmoe's MLX thread does), and synchronised per token, alternating for
--rounds rounds (medians), each thread warmed up first. Then a chain of 2,000 tiny
ops, to give MLX's encoding cost per op on each thread. The numbers say whether flashmoe's
MLX thread, rather than its graph, makes the per-layer dispatch dearer than mlx-lm's.
"""
from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from flashmoe.bench.baseline import load_resident

PROMPT = [9707, 11, 1246, 525, 498, 30, 2585, 752, 264, 2805, 3364, 911, 264, 326]


def decode(model, tokens: int, pipelined: bool) -> dict:
    """Greedy decode after PROMPT; ms per token: wall, in async_eval (CPU), other thread CPU."""
    cache = make_prompt_cache(model)
    step = lambda y: mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)  # noqa: E731
    y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    ev_cpu = 0.0
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(tokens):
        nxt = step(y)
        c = time.thread_time()
        if pipelined:
            mx.async_eval(nxt)
            ev_cpu += time.thread_time() - c
            y.item()
        else:
            mx.eval(nxt)
            ev_cpu += time.thread_time() - c
        y = nxt
    y.item()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"wall": wall / tokens * 1e3, "eval_cpu": ev_cpu / tokens * 1e3,
            "other_cpu": (cpu - ev_cpu) / tokens * 1e3}


def chain(ops: int = 2000) -> float:
    """µs of CPU per op to build and encode a chain of tiny adds (median of 3)."""
    runs = []
    for _ in range(3):
        x = mx.zeros((1, 64))
        mx.eval(x)
        c = time.thread_time()
        for _ in range(ops):
            x = x + 1.0
        mx.async_eval(x)
        runs.append((time.thread_time() - c) / ops * 1e6)
        x.item() if x.size == 1 else mx.eval(x)
    return sorted(runs)[1]


class Worker:
    """One persistent thread that set its own default device, as flashmoe's MLX thread
    (runtime/mlx_worker.py) is: its streams and MLX-CUDA's graph cache live across calls."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, initializer=lambda: mx.set_default_device(
            mx.default_device()))

    def __call__(self, fn: Callable[[], dict]) -> dict:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.submit(lambda: (mx.synchronize(), mx.clear_streams())).result()
        self._pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="float32: upcast as flashmoe does on the CPU")
    args = ap.parse_args()
    model = load_resident(args.path, args.dtype, args.k)
    layers = len(model.layers)
    worker = Worker()
    decode(model, 4, True)  # warm-up on both threads (kernels, buffers, graph caches)
    worker(lambda: decode(model, 4, True))
    rows = {"main thread, pipelined": lambda: decode(model, args.tokens, True),
            "worker thread, pipelined": lambda: worker(
                lambda: decode(model, args.tokens, True)),
            "main thread, synchronised": lambda: decode(model, args.tokens, False)}
    print(f"mlx-lm decode, {layers} layers, K={args.k}, {mx.default_device()}, "
          f"{args.rounds} rounds alternating (ms per layer, median: wall / CPU in async_eval "
          "/ other thread CPU)")
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for _ in range(args.rounds):  # alternate, so a slow spell of the host hits every row
        for name, fn in rows.items():
            runs[name].append(fn())
    res = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) / layers for k in rs[0]}
        res[name] = {k: round(v, 4) for k, v in med.items()}
        walls = ", ".join(f"{r['wall'] / layers:.3f}" for r in rs)
        print(f"  {name:28s} {med['wall']:7.3f} {med['eval_cpu']:7.3f} {med['other_cpu']:7.3f}"
              f"   (wall per round: {walls})")
    res["chain_us_per_op"] = {"main": round(chain(), 2),
                              "worker": round(worker(lambda: {"v": chain()})["v"], 2)}
    worker.close()
    print(f"  a chain of tiny ops: {res['chain_us_per_op']['main']} µs/op on the main thread, "
          f"{res['chain_us_per_op']['worker']} on a worker thread")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
