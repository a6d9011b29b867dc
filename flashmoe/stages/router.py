"""RouterStage: pick each token's top-k experts; start the shared expert meanwhile."""
from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flashmoe.models import Family
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.messages import Attended, Routed, StepStats


class RouterStage:
    def __init__(self, worker: MlxWorker, family: Family, k: int) -> None:
        self.worker, self.family, self.k = worker, family, k

    async def __call__(self, make_att: Callable[[], Attended], block: nn.Module,
                       stats: StepStats, guess: Callable[[mx.array], mx.array] | None = None
                       ) -> tuple[Attended, Routed]:
        """`make_att()` builds this layer's attention; `guess(h)`: the next layer's likely
        experts. One device trip (device_trip_ms) evaluates the previous layer's experts,
        this layer's attention and its routing. Overlap point: the shared expert is then
        started (async_eval) and evaluates while the routed experts are read."""
        t0 = time.perf_counter()
        box: list[Attended] = []

        def route():
            att = make_att()
            box.append(att)
            inds, scores = self.family.route(block, att.xn, self.k)
            return (inds, scores, att.h, att.xn) if guess is None else \
                (inds, scores, att.h, att.xn, guess(att.h))

        inds, scores, _, _, *rest = await self.worker.numpy(
            route, background=lambda: self.family.shared(block, box[0].xn))
        att = box[0]
        shared = rest[-1]
        guessed = np.array(rest[0]) if guess is not None else None
        t1 = time.perf_counter()
        experts = tuple(int(e) for e in np.unique(inds))
        stats.device_trip_ms += (t1 - t0) * 1e3
        stats.route_host_ms += (time.perf_counter() - t1) * 1e3
        return att, Routed(att.layer, inds, scores, experts, shared, guessed)

