"""A decode step whose routed experts are all in slots: the whole token as one graph.

The per-layer path needs one device trip per MoE layer: the router's choice must reach the
host before the layer's experts can be read. When every routed expert is already in a slot
(a warm cache: the usual case after a few tokens at a large budget) there is nothing to read,
and those trips are pure overhead: on the H200 they cost more than the layer's compute.

So, for a decode step, the Speculator builds every layer at once as mlx-lm does, each
layer's experts gathered through a device-side expert -> slot table (the pools' `where`
maps as they stand between steps; an expert not in a slot points at slot 0), evaluates the
token and its routing together in one trip, and only then checks on the host that every
routed expert was in a slot. The same kernels run on the same shapes as the per-layer path
(one gather over the layer's slot stack, slot ids of the same dtype), so the logits are the
same bits. If a layer L routed to an expert that was not in a slot, layers before L stand
(their cache updates and L's input are right), the caches of layers L.. are rolled back to
their state before the step, and the per-layer path goes on from L with L's evaluated input.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

# How often the whole-token step hands a layer's output to MLX before the token is built:
# on the CPU backend after every MoE layer (graph building overlaps the compute thread's work:
# BENCHMARKS (k)); on CUDA each extra evaluation costs more than the overlap saves (resident
# mlx-lm on the H200, 13 shape-faithful layers, K=4: 11.08 ms per token evaluated once,
# 12.92 with an async_eval per layer: bench/sync_cost.py, BENCHMARKS "NVIDIA H200").
EVAL_EVERY = {"cpu": 1, "gpu": 1}
ROLLBACK = (KVCache, ArraysCache)  # caches whose step can be undone by restoring attributes
Attend = Callable[[int, Any, Callable[[], mx.array]], Callable[[], Any]]


@dataclass(slots=True)
class Outcome:
    """logits when every layer was served; else the first layer to run the per-layer path."""

    logits: mx.array | None
    layer: int = 0
    x: mx.array | None = None  # that layer's input, evaluated


class Speculator:
    def __init__(self, pipeline: Any) -> None:
        self.p = pipeline
        self.moe = {i: b for i, b in enumerate(pipeline.cached.blocks) if b is not None}
        self.num_experts = pipeline.r.num_experts
        # policy none frees every slot after its use: nothing is ever there to serve
        self.keeps = all(pipeline.fetch.pools[i].policy != "none" for i in self.moe)
        self._tables: dict[int, tuple[tuple, mx.array]] = {}  # layer -> (pool, changes), table
        # Start every EVAL_EVERY-th MoE layer's output on the device as soon as it is built, so
        # the device computes while the host builds the next layers (0: the token in one
        # evaluation). Per backend: see EVAL_EVERY.
        self.eval_every = EVAL_EVERY.get(getattr(pipeline.worker, "device", "cpu"), 1)

    def usable(self, caches: list[Any]) -> bool:
        """Only caches whose step can be undone (mlx-lm's KVCache, ArraysCache), and pools
        that keep experts between steps."""
        return self.keeps and all(type(c) in ROLLBACK for c in caches)

    async def __call__(self, step: Any, x0: mx.array, attend: Attend,
                       caches: list[list[Any]], all_logits: bool = False) -> Outcome:
        """attend(i, layer, x_fn) -> a builder of layer i's Attended (Pipeline.through_layers'
        argument); caches[i]: every cache object layer i's attention updates (one per
        sequence), put back as they were if the layer has to run again."""
        stats = step.stats
        t0 = time.perf_counter()
        where = {i: self.p.fetch.pools[i].where(i, self.num_experts) for i in self.moe}
        saved = [[_snapshot(c) for c in layer] for layer in caches]
        logits, routed, xs = await self.p.worker.run(self._token, x0, attend, where, all_logits)
        t1 = time.perf_counter()
        first = len(self.p.layers)  # the first layer that routed outside the slots
        for i, inds in routed.items():
            if (where[i][inds] < 0).any():
                first = i
                break
            self._touch(i, inds, stats)
        stats.device_trip_ms += (t1 - t0) * 1e3
        stats.route_host_ms += (time.perf_counter() - t1) * 1e3
        served = sum(1 for i in self.moe if i < first)
        stats.extra["speculated_layers"] = stats.extra.get("speculated_layers", 0) + served
        if first == len(self.p.layers):
            return Outcome(logits)
        for layer, snaps in zip(caches[first:], saved[first:]):
            for c, snap in zip(layer, snaps):
                _restore(c, snap)
        stats.extra["speculation_missed_at"] = first
        return Outcome(None, first, xs[first])

    def _token(self, x0: mx.array, attend: Attend, where: dict[int, np.ndarray],
               all_logits: bool
               ) -> tuple[mx.array, dict[int, np.ndarray], list[mx.array]]:
        """Every layer and the head in one graph, evaluated with the routing (MLX thread)."""
        p, fam = self.p, self.p.r.family
        tables = {i: self._table(i, w) for i, w in where.items()}
        x, xs, inds, every = x0, [], {}, self.eval_every
        for i, layer in enumerate(p.layers):
            xs.append(x)
            att = attend(i, layer, lambda x=x: x)()
            block = self.moe.get(i)
            if block is None:
                x = att.h + fam.dense_mlp(layer, att.xn)
                continue
            inds[i], scores = fam.route(block, att.xn, p.k)
            shared = fam.shared(block, att.xn)
            x = p.compute.output(att, tables[i][inds[i]], scores, shared,
                                 block.switch_mlp.activation)
            if every and len(inds) % every == 0:
                mx.async_eval(x)  # the device runs this layer while the host builds the next
        logits = p._head(x, all_logits)
        order = list(inds)
        flat = mx.concatenate([inds[i].reshape(-1) for i in order]) if order else None
        mx.eval(logits, *xs, *([flat] if flat is not None else []))
        routed = {}
        if flat is not None:
            host = np.array(flat).reshape(len(order), -1)
            routed = {i: host[n] for n, i in enumerate(order)}
        return logits, routed, xs

    def _table(self, layer: int, where: np.ndarray) -> mx.array:
        """The layer's device-side expert -> slot table (uint32, like the per-layer path's
        slot ids; experts not in a slot read slot 0), rebuilt only when the map changed."""
        pool = self.p.fetch.pools[layer]
        version = (id(pool), pool.changes.get(layer, 0))
        held = self._tables.get(layer)
        if held is None or held[0] != version:
            held = self._tables[layer] = (version, mx.array(np.maximum(where, 0).astype(np.uint32)))
        return held[1]

    def _touch(self, layer: int, inds: np.ndarray, stats: Any) -> None:
        """A served layer's experts were used: the cache's recency and counts see it, as a
        per-layer step's grant and release would."""
        experts = sorted(set(inds.reshape(-1).tolist()))
        self.p.fetch.pools[layer].touch(layer, experts)
        stats.experts_hit += len(experts)


def _snapshot(cache: Any) -> dict:
    """The attributes a step replaces (KVCache: offset and, when it grows, its buffers;
    ArraysCache: its list of states, copied since a step assigns into it)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(cache).items()}


def _restore(cache: Any, snap: dict) -> None:
    for k, v in snap.items():
        setattr(cache, k, list(v) if isinstance(v, list) else v)
