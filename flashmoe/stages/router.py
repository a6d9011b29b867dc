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
        t0 = time.perf_counter()
        inds, scores = await self.worker.numpy(self.family.route, block, att.xn, self.k)
        # the shared expert does not wait on any read: let it evaluate during the fetch
        shared = await self.worker.start(self.family.shared, block, att.xn)
        stats.router_ms += (time.perf_counter() - t0) * 1e3
        experts = tuple(int(e) for e in np.unique(inds))
        return Routed(att.layer, inds, scores, experts, shared)

