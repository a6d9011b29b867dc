"""TokenGraph: a decode token as one graph, as resident mlx-lm runs it, while the cache holds
every expert the token routes to.

Layer by layer, each router's choice must come back to the host before its experts can be
fetched: one device round trip per layer, with the device idle while the host builds the
next graph. When the slots already hold every routed expert, the host need not know the
choice first: a device-side table maps (layer, expert) to slot, so the whole token (every
layer's attention, router, table lookup, gather over the slots, and the head) is built and
evaluated at once. The routed ids come back with the logits and are checked: an expert that
was not cached (its lookup read a wrong slot) rolls the KV / Gated DeltaNet caches back, and
the token is run again layer by layer, which reads it.

Exactness: the ops are the per-layer path's, on the same shapes, and the slot ids are the
same uint32 values in the same [B, L, k] shape; only where the ids are computed differs.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

from flashmoe.kernels.moe import gather_experts

if TYPE_CHECKING:
    from flashmoe.stages.pipeline import Pipeline, StepState


class TokenGraph:
    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        fam = pipeline.r.family
        self.blocks = [fam.moe_block(layer) for layer in pipeline.layers]
        self.experts = pipeline.r.num_experts
        self.pools = list({id(pl): pl for pl in pipeline.fetch.pools.values()}.values())
        self._table: list[mx.array] | None = None
        self._host = np.zeros((0, 0), dtype=np.uint32)  # the table as the lookups saw it
        self._version: tuple[int, ...] = ()
        self.missed = False  # the last try read an uncached expert: next token layer by layer

    def eligible(self, step: StepState, ids: list[int], head: bool) -> bool:
        """A decode token whose caches can be rolled back, on a cache that keeps experts."""
        if len(ids) != 1 or not head or self.missed or all(b is None for b in self.blocks):
            return False
        if any(pool.policy == "none" for pool in self.pools):
            return False
        return all(_snapshot(c) is not None for c in step.cache)

    def __call__(self, step: StepState, x: mx.array, masks: list[Any],
                 all_logits: bool) -> mx.array | None:
        """In the MLX thread: the token's logits, evaluated; None (caches rolled back) when
        the token routed to an expert that is not cached."""
        p, fam, stats = self.p, self.p.r.family, step.stats
        t0 = time.perf_counter()
        saved = [_snapshot(c) for c in step.cache]
        table = self._device_table()
        routed: list[tuple[int, mx.array]] = []  # (layer, ids [B, L, k])
        for i, layer in enumerate(p.layers):
            h = fam.attention(layer, x, masks[i], step.cache[i])
            xn = fam.mlp_input(layer, h)
            block = self.blocks[i]
            if block is None:
                x = h + fam.dense_mlp(layer, xn)
                continue
            inds, scores = fam.route(block, xn, p.k)
            shared = fam.shared(block, xn)
            slots = mx.take(table[i], inds)  # [B, L, k] uint32, as _slot_ids
            w = p.fetch.pools[i].store.weights()
            y = gather_experts(xn, slots, w, p.compute.quant[i], block.switch_mlp.activation)
            x = h + fam.combine(y, scores, shared)
            mx.async_eval(x)  # the device runs this layer while the host builds the next
            routed.append((i, inds))
        logits = p._head(x, all_logits)
        ids = mx.concatenate([inds.reshape(-1) for _, inds in routed])  # one readback
        mx.eval(logits, ids)
        stats.device_trip_ms += (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        flat, n = np.array(ids).tolist(), len(ids) // max(1, len(routed))
        chosen = [(i, sorted(set(flat[j * n:(j + 1) * n]))) for j, (i, _) in enumerate(routed)]
        # the slot each lookup used must still hold its expert (so a missed version bump
        # could only cost a rerun, never a wrong result)
        ok = all(p.fetch.pools[i].slot_of(i, e) == self._host[i, e]
                 for i, experts in chosen for e in experts)
        if ok:
            for i, experts in chosen:  # the cache's recency and counters, as layer by layer
                pool = p.fetch.pools[i]
                pool.release(pool.grant(i, experts))
                stats.experts_hit += len(experts)
        else:
            for c, state in zip(step.cache, saved):
                _restore(c, state)
            self.missed = True
        stats.route_host_ms += (time.perf_counter() - t1) * 1e3
        stats.extra["token_graph"] = stats.extra.get("token_graph", 0) + 1
        if not ok:
            stats.extra["token_graph_missed"] = stats.extra.get("token_graph_missed", 0) + 1
        return logits if ok else None

    def _device_table(self) -> list[mx.array]:
        """Per layer, expert -> slot of every cached expert (0 where none: such a lookup is
        caught by the check after the evaluation); rebuilt when a slot changed owner."""
        version = tuple(pool.version for pool in self.pools)
        if self._table is None or version != self._version:
            table = np.zeros((len(self.p.layers), self.experts), dtype=np.uint32)
            for pool in self.pools:
                for (layer, e), s in pool.owners():
                    table[layer, e] = s
            self._table, self._version = [mx.array(row) for row in table], version
            self._host = table
        return self._table


def _snapshot(cache: Any) -> Any:
    """What undoing one token needs, or None for a cache this cannot undo."""
    if type(cache) is KVCache:
        return cache.offset  # the token's keys land past it and are overwritten on the rerun
    if type(cache) is ArraysCache and cache.lengths is None and cache.left_padding is None:
        return list(cache.cache)  # a Gated DeltaNet layer replaces its arrays, never edits
    return None


def _restore(cache: Any, state: Any) -> None:
    if type(cache) is KVCache:
        cache.offset = state
    else:
        cache.cache = list(state)
