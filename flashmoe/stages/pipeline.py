"""The pipeline: attention → router → expert-fetch → expert-compute per layer, then sampling."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from flashmoe.models.loader import Resident
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.io_pool import IOPool
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.attention import AttentionStage
from flashmoe.stages.expert_compute import ExpertComputeStage
from flashmoe.stages.expert_fetch import ExpertFetchStage
from flashmoe.stages.messages import Attended, StepStats
from flashmoe.stages.prefetch import Prefetcher, guess_next
from flashmoe.stages.router import RouterStage
from flashmoe.stages.sampling import Sampler, SamplingStage


class Pipeline:
    """Runs one forward step (a whole prompt, or one token) through the stages."""

    def __init__(self, resident: Resident, worker: MlxWorker, store: ExpertStore,
                 pools: dict[int, SlotPool], io: IOPool, k: int, sampler: Sampler,
                 dtype: mx.Dtype | None = None, verify: bool = False,
                 prefetch: bool = False) -> None:
        self.r, self.worker, self.dtype = resident, worker, dtype
        fam = resident.family
        self.layers = fam.layers(resident.model)
        quant = {i: {p: (b, g, m) for p, b, g, m in le.quant}
                 for i, le in resident.experts.items()}
        self.attention = AttentionStage(fam)
        self.router = RouterStage(worker, fam, k)
        self.fetch = ExpertFetchStage(store, pools, io, verify)
        self.compute = ExpertComputeStage(worker, fam, pools, quant)
        self.sampling = SamplingStage(worker, sampler)
        self.prefetch = Prefetcher(self.fetch) if prefetch else None
        self.k = k

    async def forward(self, ids: list[int], cache: list[Any], stats: StepStats,
                      all_logits: bool = False, head: bool = True) -> mx.array | None:
        """Logits [1, L, V] (or [1, 1, V] for the last position) for `ids` after `cache`.

        head=False (a prefill step): only the caches are brought up to date, as mlx-lm's
        prefill evaluates only the cache states; the last layer's experts are not needed."""
        fam, model = self.r.family, self.r.model
        x0 = await self.worker.build(self._embed, ids)
        masks = await self.worker.build(fam.masks, model, x0, cache)
        self._pending = []  # slot grants whose computation has not been evaluated yet
        x_fn: Callable[[], mx.array] = lambda: x0  # noqa: E731 - a chain of graph builders
        try:
            for i, layer in enumerate(self.layers):
                att_fn = partial(self.attention.build, i, layer, x_fn, masks[i], cache[i])
                block = fam.moe_block(layer)
                if block is None:
                    x_fn = partial(self._dense, layer, att_fn)
                    continue
                x_fn = await self._experts(att_fn, block, stats, decode=len(ids) == 1)
            t0 = time.perf_counter()
            if not head:
                await self.worker.run(lambda: [c.state for c in cache])
                return None
            logits = await self.worker.run(lambda: self._head(x_fn(), all_logits))
            stats.expert_compute_ms += (time.perf_counter() - t0) * 1e3
            return logits
        finally:
            if self.prefetch is not None:
                await self.prefetch.cancel()
            self._release_pending()  # evaluated above, or abandoned on an error

    async def sample(self, logits: mx.array, stats: StepStats) -> int:
        return await self.sampling(logits, stats)

    def _release_pending(self) -> None:
        for pool, grant in self._pending:
            pool.release(grant)
        self._pending = []

    def _guesser(self, index: int, decode: bool):
        """Prefetch (decode only): a function guessing the next MoE layer's experts."""
        nxt = index + 1
        if self.prefetch is None or not decode or nxt >= len(self.layers):
            return None
        fam, layer = self.r.family, self.layers[nxt]
        block = fam.moe_block(layer)
        if block is None:
            return None
        return lambda h: guess_next(fam, layer, block, h, self.k)

    def _dense(self, layer: nn.Module, att_fn: Callable[[], Attended]) -> mx.array:
        att = att_fn()
        return att.h + self.r.family.dense_mlp(layer, att.xn)

    async def _experts(self, att_fn: Callable[[], Attended], block: nn.Module,
                       stats: StepStats, decode: bool = False) -> Callable[[], mx.array]:
        layer = att_fn.args[0]
        att, routed = await self.router(att_fn, block, stats, self._guesser(layer, decode))
        self._release_pending()  # the routing evaluation consumed the previous layer's slots
        if self.prefetch is not None:
            await self.prefetch.settle(att.layer, routed.experts, stats)
        chunks = self.fetch.plan(att.layer, routed.experts)
        act = block.switch_mlp.activation
        if len(chunks) == 1:
            fetched = await self.fetch(att.layer, chunks[0], stats)
            if routed.guess is not None:  # read the next layer's guess while this one computes
                self.prefetch.start(att.layer + 1, routed.guess, stats)
            x_fn = self.compute.whole(att, routed, fetched, act)
            self._pending.append((self.fetch.pools[att.layer], fetched.grant))
            return x_fn
        # the union exceeds the slots: chunk by chunk, each chunk's slots released after use
        stats.chunks += len(chunks)
        y = None
        for chunk in chunks:
            fetched = await self.fetch(att.layer, chunk, stats)
            y = await self.compute.partial(att, routed, fetched, y, act, stats)
        x = await self.compute.finish(att, routed, y, stats)
        return lambda: x

    def _embed(self, ids: list[int]) -> mx.array:
        x = self.r.family.embed(self.r.model, mx.array([ids]))
        return x if self.dtype is None else x.astype(self.dtype)

    def _head(self, x: mx.array, all_logits: bool) -> mx.array:
        if not all_logits:
            x = x[:, -1:, :]
        return self.r.family.head(self.r.model, x)
