"""Cost of the expert cache's bookkeeping per grant + release, from 100 to 30,000 slots.

    PYTHONPATH=. python bench/slot_pool_ops.py [--slots 100,1000,10000,30000] [--policy lru,lfu]

A decode-shaped workload on a full cache: each step grants K experts of a layer (skewed
routing, so some hit and some miss; 60 layers x 512 experts, so 30,000 slots hold almost
all of them), holds the grant while the next layer is granted (the
pipeline's pending slots), then releases it. Prints µs per grant+release and the miss rate;
flat across pool sizes means no per-slot scan (issue 12). Bookkeeping only: the slot arrays
are one 4-byte part, no bytes are read.
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from flashmoe.runtime.expert_store import LayerExperts, PartSpec
from flashmoe.runtime.slot_pool import SlotPool

LAYERS, EXPERTS, K = 60, 512, 10  # Qwen3.5-397B-shaped routing


def workload(steps: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, EXPERTS + 1) ** 0.8  # a router's skew
    p /= p.sum()
    return [(step % LAYERS, [int(e) for e in np.unique(rng.choice(EXPERTS, K, p=p))])
            for step in range(steps)]


def run(n: int, policy: str, steps: int) -> tuple[float, float]:
    """(µs per grant+release, misses per routed expert) on a full cache of `n` slots."""
    part = PartSpec("gate_proj.weight", (1,), mx.uint32, 4)
    pool = SlotPool(LayerExperts(0, EXPERTS, (part,), (), ()), n, policy)
    work = workload(steps + n // K + 10)
    held = None
    for layer, experts in work[: n // K + 10]:  # fill the cache: every later miss evicts
        grant = pool.grant(layer, experts)
        if held is not None:
            pool.release(held)
        held = grant
    misses0, t0 = pool.misses, time.perf_counter()
    for layer, experts in work[n // K + 10:]:
        grant = pool.grant(layer, experts)
        pool.release(held)
        held = grant
    dt = time.perf_counter() - t0
    return dt / steps * 1e6, (pool.misses - misses0) / (steps * K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="100,1000,10000,30000")
    ap.add_argument("--policy", default="lru,lfu")
    ap.add_argument("--steps", type=int, default=20000)
    args = ap.parse_args()
    print(f"{'policy':6} {'slots':>6} {'us/grant+release':>17} {'miss rate':>9}")
    for policy in args.policy.split(","):
        for n in (int(s) for s in args.slots.split(",")):
            per_step, miss_rate = run(n, policy, args.steps)
            print(f"{policy:6} {n:6d} {per_step:17.2f} {miss_rate:9.3f}")


if __name__ == "__main__":
    main()
