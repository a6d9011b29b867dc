"""RouterStage: pick each token's top-k experts; start the shared expert meanwhile."""
from __future__ import annotations

import time

import mlx.nn as nn
import numpy as np

from flashmoe.models import Family
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.messages import Attended, Routed, StepStats


class RouterStage:
    def __init__(self, worker: MlxWorker, family: Family, k: int) -> None:
        self.worker, self.family, self.k = worker, family, k

    async def __call__(self, att: Attended, block: nn.Module, stats: StepStats) -> Routed:
        # one device trip: evaluating the routing also runs this layer's attention (and the
        # previous layer's experts); the shared expert then starts while experts are read
        t0 = time.perf_counter()
        inds, scores, shared = await self.worker.numpy(
            self.family.route, block, att.xn, self.k,
            background=lambda: self.family.shared(block, att.xn))
        t1 = time.perf_counter()
        experts = tuple(int(e) for e in np.unique(inds))
        stats.attention_ms += (t1 - t0) * 1e3
        stats.router_ms += (time.perf_counter() - t1) * 1e3
        return Routed(att.layer, inds, scores, experts, shared)

