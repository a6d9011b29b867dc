"""ExpertParallelStage: one MoE layer's routed experts when several ranks share them.

Every rank routes (the resident part is replicated), fetches and computes only the pairs
whose expert it owns, writing zeros for the others; one all_sum of the per-pair outputs
y [B*L*k, D] gives every rank all pairs, each computed by exactly one rank (x + 0.0 is exact),
and each rank combines them (weighted sum over k, shared expert, residual) as one process
does: the tokens and logits are those of one process.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Awaitable, Callable

import mlx.core as mx

from flashmoe.runtime.dist import ExpertParallel
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.expert_compute import ExpertComputeStage
from flashmoe.stages.expert_fetch import ExpertFetchStage
from flashmoe.stages.messages import Attended, Fetched, Routed, StepStats

FetchFn = Callable[[int, list[int], StepStats], Awaitable[Fetched]]


class ExpertParallelStage:
    def __init__(self, parallel: ExpertParallel, worker: MlxWorker, fetch: ExpertFetchStage,
                 compute: ExpertComputeStage, num_experts: int) -> None:
        self.parallel, self.worker = parallel, worker
        self.fetch, self.compute = fetch, compute
        self.share = parallel.share(num_experts)

    async def __call__(self, fetch: FetchFn, att: Attended, routed: Routed,
                       activation: Callable, stats: StepStats) -> mx.array:
        """The layer's output x [B, L, D] (evaluated), the same on every rank."""
        y = await self.summed(fetch, att, routed, activation, stats)
        return await self.compute.finish(att, routed, y, stats)

    async def summed(self, fetch: FetchFn, att: Attended, routed: Routed,
                     activation: Callable | None, stats: StepStats,
                     dtype: mx.Dtype | None = None) -> mx.array:
        """Every (token, k) pair's expert output y [B*L*k, D], each computed by its owner."""
        owned = tuple(e for e in routed.experts if e in self.share)
        y = None
        if owned:
            chunks = self.fetch.plan(att.layer, owned)
            if len(chunks) > 1:
                stats.chunks += len(chunks)
            for chunk in chunks:
                fetched = await fetch(att.layer, chunk, stats)
                y = await self.compute.partial(att, routed, fetched, y, activation, stats)
        t0 = time.perf_counter()
        zeros = partial(_or_zeros, y, att, routed, dtype or att.xn.dtype)
        y = await self.parallel.all_sum(self.worker.run, zeros, f"layer {att.layer}'s all_sum")
        stats.extra["allreduce_ms"] = stats.extra.get("allreduce_ms", 0.0) + \
            (time.perf_counter() - t0) * 1e3
        return y


def _or_zeros(y: mx.array | None, att: Attended, routed: Routed, dtype: mx.Dtype) -> mx.array:
    """None of this layer's pairs is ours: we add zeros (built in the MLX thread)."""
    if y is not None:
        return y
    return mx.zeros((routed.inds.size, att.xn.shape[-1]), dtype=dtype)  # [T*k, D]
