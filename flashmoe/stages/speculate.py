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

from flashmoe.stages.sampling import sample_graph

# How often the whole-token step hands a MoE layer's output to MLX while the token is built
# (0: once, at the end): every layer, so the device computes while the host builds the next.
# Measured on the H200 (13 shape-faithful layers, K=4, bench/host_overhead.py --eval-every):
# 0.690 ms per layer at 1, 1.052 at 0, 0.976 at 3; on the CPU it overlaps the compute thread
# (BENCHMARKS (k)).
EVAL_EVERY = 1
ROLLBACK = (KVCache, ArraysCache)  # caches whose step can be undone by restoring attributes
Attend = Callable[[int, Any, Callable[[], mx.array]], Callable[[], Any]]


@dataclass(slots=True)
class Outcome:
    """logits when every layer was served; else the first layer to run the per-layer path."""

    logits: mx.array | None
    layer: int = 0
    x: mx.array | None = None  # that layer's input, evaluated
    token: int | None = None  # the step's sampled token, when the step sampled (lookahead)


@dataclass(slots=True)
class Ahead:
    """The next decode step, built from this step's sampled token (still on the device) and
    started before this step's routing was checked, as mlx-lm's generate_step starts token
    t+1 before reading t back. Used by the next step when it decodes exactly that token on
    the same caches with the same slot tables; otherwise its cache updates are undone."""

    caches: list  # every layer's cache objects (as the step's `caches`)
    value: int  # the token it was built from
    versions: tuple  # the slot tables it was built with
    saved: list  # every layer's cache state before it was built
    masks: list  # its attention masks (the per-layer path needs them after a miss)
    logits: mx.array
    inds: dict
    xs: list
    owner: Any = None  # the session's cache list (identity): whose step this is


class Speculator:
    def __init__(self, pipeline: Any) -> None:
        self.p = pipeline
        self.moe = {i: b for i, b in enumerate(pipeline.cached.blocks) if b is not None}
        self.num_experts = pipeline.r.num_experts
        # policy none frees every slot after its use: nothing is ever there to serve
        self.keeps = all(pipeline.fetch.pools[i].policy != "none" for i in self.moe)
        self._tables: dict[int, tuple[tuple, mx.array]] = {}  # layer -> (pool, changes), table
        self.eval_every = EVAL_EVERY  # bench/host_overhead.py --eval-every sets it
        self.ahead: Ahead | None = None  # the next decode step, started (lookahead)
        self.lookahead = True  # bench/host_overhead.py --no-lookahead clears it

    def take(self, caches: list[Any], ids: list[int]) -> Ahead | None:
        """The step built ahead for this decode of `ids` on these caches, or None. One ahead
        step at most, of one session: any other use of the model undoes it first (its
        cache updates rolled back; its device work, if still running, is simply unused)."""
        a, self.ahead = self.ahead, None
        if a is None:
            return None
        if a.owner is caches and ids == [a.value] and a.versions == self._versions():
            return a
        self.discard(a)
        return None

    def settle(self) -> None:
        """Undo the ahead step, if any: something else than its own decode comes next."""
        a, self.ahead = self.ahead, None
        if a is not None:
            self.discard(a)

    @staticmethod
    def discard(a: Ahead) -> None:
        _restore_all(a.caches, a.saved)

    def _version(self, layer: int) -> tuple[int, int]:
        """Which state of the layer's expert -> slot map (its pool, that pool's changes)."""
        pool = self.p.fetch.pools[layer]
        return id(pool), pool.changes.get(layer, 0)

    def _versions(self) -> tuple:
        return tuple(self._version(i) for i in self.moe)

    def usable(self, caches: list[Any]) -> bool:
        """Only caches whose step can be undone (mlx-lm's KVCache, ArraysCache), and pools
        that keep experts between steps."""
        return self.keeps and all(type(c) in ROLLBACK for c in caches)

    async def __call__(self, step: Any, x0: mx.array | None, attend: Attend,
                       caches: list[list[Any]], all_logits: bool = False,
                       ahead: Ahead | None = None, sampler: Callable | None = None,
                       next_inputs: Callable | None = None) -> Outcome:
        """attend(i, layer, x_fn) -> a builder of layer i's Attended (Pipeline.through_layers'
        argument); caches[i]: every cache object layer i's attention updates (one per
        sequence), put back as they were if the layer has to run again. `ahead`: this step,
        already built by the last one. `sampler` (pure: greedy) samples in the same trip;
        with `next_inputs(y) -> (x0, attend, masks)` the next step is built and started
        before this one's routing is checked (Ahead)."""
        stats = step.stats
        if ahead is None:
            self.settle()  # a batched step (pipeline.forward settled already)
        t0 = time.perf_counter()
        where = {i: self.p.fetch.pools[i].where(i, self.num_experts) for i in self.moe}
        saved = ahead.saved if ahead is not None else \
            [[_snapshot(c) for c in layer] for layer in caches]
        logits, routed, xs, token, nxt = await self.p.worker.run(
            self._step, x0, attend, where, all_logits, ahead, sampler, next_inputs, caches)
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
        if ahead is not None:
            stats.extra["built_ahead"] = 1  # this step was built and started by the last one
        if first == len(self.p.layers):
            if nxt is not None:
                nxt.owner, self.ahead = step.cache, nxt
            return Outcome(logits, token=token)
        if nxt is not None:
            self.discard(nxt)  # back to this step's state, then its layers first.. as before
        _restore_all(caches[first:], saved[first:])
        stats.extra["speculation_missed_at"] = first
        return Outcome(None, first, xs[first])

    def _step(self, x0: mx.array | None, attend: Attend, where: dict[int, np.ndarray],
              all_logits: bool, ahead: Ahead | None, sampler: Callable | None,
              next_inputs: Callable | None, caches: list
              ) -> tuple[mx.array, dict[int, np.ndarray], list[mx.array], int | None,
                         Ahead | None]:
        """This token (built now, or by the last step), its sampled token, the next step
        started (MLX thread); then this token and its routing evaluated in one trip."""
        tables = {i: self._table(i, w) for i, w in where.items()}
        if ahead is None:
            logits, inds, xs = self._token(x0, attend, tables, all_logits)
        else:
            logits, inds, xs = ahead.logits, ahead.inds, ahead.xs
        y = nxt = None
        if sampler is not None:
            y = sample_graph(logits, sampler)
            if next_inputs is not None:
                nxt = self._ahead(y, next_inputs, tables, caches)
        order = list(inds)
        flat = mx.concatenate([inds[i].reshape(-1) for i in order]) if order else None
        mx.eval(logits, *xs, *([flat] if flat is not None else []), *([y] if y is not None else []))
        routed = {}
        if flat is not None:
            host = np.array(flat).reshape(len(order), -1)
            routed = {i: host[n] for n, i in enumerate(order)}
        token = None
        if y is not None:
            token = int(y.reshape(-1)[0].item())
            if nxt is not None:
                nxt.value = token
        return logits, routed, xs, token, nxt

    def _ahead(self, y: mx.array, next_inputs: Callable, tables: dict, caches: list) -> Ahead:
        saved = [[_snapshot(c) for c in layer] for layer in caches]
        x0, attend, masks = next_inputs(y)
        logits, inds, xs = self._token(x0, attend, tables, False)
        return Ahead(caches, -1, self._versions(), saved, masks, logits, inds, xs)

    def _token(self, x0: mx.array, attend: Attend, tables: dict[int, mx.array],
               all_logits: bool) -> tuple[mx.array, dict[int, mx.array], list[mx.array]]:
        """Every layer and the head as one graph, each MoE layer started as it is built."""
        p, fam = self.p, self.p.r.family
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
        return p._head(x, all_logits), inds, xs

    def _table(self, layer: int, where: np.ndarray) -> mx.array:
        """The layer's device-side expert -> slot table (uint32, like the per-layer path's
        slot ids; experts not in a slot read slot 0), rebuilt only when the map changed."""
        version = self._version(layer)
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


def _restore_all(caches: list[list[Any]], saved: list[list[dict]]) -> None:
    for layer, snaps in zip(caches, saved):
        for c, snap in zip(layer, snaps):
            _restore(c, snap)


def _restore(cache: Any, snap: dict) -> None:
    for k, v in snap.items():
        setattr(cache, k, list(v) if isinstance(v, list) else v)
