"""CachedRun: consecutive layers whose routed experts are all in the slots (or in the host
tier, copied in without a read), in one MLX job.

The asyncio stages cost one event-loop <-> MLX-thread round trip per layer (the router's
trip) plus the fetch stage's planning, even when nothing is read. With every expert of a layer
cached there is nothing to wait for: this runs attention -> router -> grant -> expert compute
layer after layer inside the MLX thread, and hands the first layer with a miss back to the
stages (fetch, then compute), which resume it here at the next layer. Experts held by the
host tier are no miss: the grant copies them in (as the fetch stage's grant would), so a
two-tier cache with every expert in one tier or the other reads nothing and makes no trip
to the event loop (at K=10 on the H200 nearly every layer promotes a few).

The MLX ops are the stages' own (RouterStage, ExpertComputeStage.whole) in the same order, on
the same shapes: a layer's output is the same bits whichever path ran it.
"""
from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flashmoe.stages.messages import Attended, Fetched, Routed, StepStats

if TYPE_CHECKING:
    from flashmoe.runtime.slot_pool import SlotGrant, SlotPool
    from flashmoe.stages.pipeline import Pipeline, StepState

XFn = Callable[[], mx.array]
Attend = Callable[[int, nn.Module, XFn], Callable[[], Attended]]
Miss = tuple[Attended, Routed, nn.Module]  # a layer the stages must fetch for
Landing = tuple["SlotPool", "SlotGrant"]  # a grant whose CUDA copies in may still run


class CachedRun:
    """Runs layers from `start` while each one's union of experts is cached and fits."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.blocks = [pipeline.r.family.moe_block(layer) for layer in pipeline.layers]

    def __call__(self, step: StepState, start: int, x_fn: XFn,
                 attend: Attend) -> tuple[int, XFn, Miss | None]:
        """In the MLX thread: (index reached, its input's builder, None) after the last
        layer, or (index, the previous output's builder, the layer's routing) at a miss."""
        landing: list[Landing] = []  # at most one grant whose CUDA copies in may still run
        try:
            return self._run(step, start, x_fn, attend, landing)
        except BaseException:
            if landing:  # an error before its evaluation: the copies land, or it is dropped
                with contextlib.suppress(BaseException):
                    self._land(landing.pop(), step)
            raise

    def _run(self, step: StepState, start: int, x_fn: XFn, attend: Attend,
             landing: list[Landing]) -> tuple[int, XFn, Miss | None]:
        p, stats = self.p, step.stats
        for i in range(start, len(p.layers)):
            layer, block = p.layers[i], self.blocks[i]
            att_fn = attend(i, layer, x_fn)
            if block is None:
                x_fn = partial(p._dense, layer, att_fn)
                continue
            held = landing.pop() if landing else None
            att, routed = self._route(att_fn, block, step, held)
            p._release_pending(step)  # the routing evaluation consumed the previous slots
            pool = p.fetch.pools[i]
            if len(routed.experts) > pool.free_slots() or not pool.servable(i, routed.experts):
                if routed.shared is not None:  # it computes while the experts are read
                    mx.async_eval(routed.shared)
                return i, x_fn, (att, routed, block)
            grant = pool.grant(i, list(routed.experts))
            try:
                assert not grant.misses, "servable() promised every expert from a tier"
                x = p.compute.whole(att, routed, Fetched(i, grant, 0, 0.0),
                                    block.switch_mlp.activation)()
                if grant.promoted and pool.cuda is not None:
                    landing.append((pool, grant))  # lands while the next graph is built
                elif grant.promoted:
                    _promoted(pool, grant, stats, step.read_experts)
            except BaseException:  # a failed copy in: no slot stays marked as holding it
                pool.release(grant, valid=False)
                raise
            stats.experts_hit += len(grant.slots) - len(grant.promoted)
            if not landing:
                mx.async_eval(x)  # the experts compute while the next layer's graph is built
            x_fn = partial(_given, x)
            step.pending.append((pool, grant))
        if landing:
            self._land(landing.pop(), step)  # before the head's evaluation reads the slots
        return len(p.layers), x_fn, None

    def _route(self, att_fn: Callable[[], Attended], block: nn.Module, step: StepState,
               landing: Landing | None) -> tuple[Attended, Routed]:
        """RouterStage's trip, inline: evaluate the previous layer's experts, this layer's
        attention and routing, and read the choice back. The shared expert is built, not
        started: with every expert cached it evaluates with the routed ones (one launch).
        `landing`: the previous layer's copies in, landed once this graph is built."""
        fam, stats = self.p.r.family, step.stats
        t0 = time.perf_counter()
        att = att_fn()
        inds, scores = fam.route(block, att.xn, self.p.k)
        self._land(landing, step)
        mx.eval(inds, scores, att.h, att.xn)
        ids = np.array(inds)
        t1 = time.perf_counter()
        shared = fam.shared(block, att.xn)
        experts = tuple(sorted(set(ids.ravel().tolist())))
        stats.device_trip_ms += (t1 - t0) * 1e3
        stats.route_host_ms += (time.perf_counter() - t1) * 1e3
        return att, Routed(att.layer, ids, scores, experts, shared)

    @staticmethod
    def _land(landing: Landing | None, step: StepState) -> None:
        """A layer's copies in from the host tier (CUDA) have landed; the evaluation that
        reads its slots may start. Its output was not started when it was built: the copies
        run while the host builds the next layer's attention and routing instead of the host
        waiting for them (on the H200 at K=10 a layer promotes ~4 experts, 28 MB). If they
        failed, the grant is dropped: no slot stays marked as holding what did not land."""
        if landing is None:
            return
        pool, grant = landing
        try:
            _promoted(pool, grant, step.stats, step.read_experts)
        except BaseException:
            step.pending.remove(landing)
            pool.release(grant, valid=False)
            raise


def _promoted(pool, grant, stats: StepStats, read: bool) -> None:
    """Experts the grant copied in from the host tier, as the fetch stage finishes them: on
    CUDA the copies were enqueued by the grant (the graph was built meanwhile) and must land
    before the evaluation; widened parts are widened (unless a compute-alone run)."""
    if pool.cuda is not None:
        pool.cuda.synchronize(down=False)
    if read:
        for _, s in grant.promoted:
            pool.store.finish(s)
    stats.extra["experts_host_hit"] = stats.extra.get("experts_host_hit", 0) + len(grant.promoted)


def _given(x: mx.array) -> mx.array:
    return x
