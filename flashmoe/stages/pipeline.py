"""The pipeline: attention → router → expert-fetch → expert-compute per layer, then sampling.

A Pipeline is shared by every session of a model and holds no per-generation state: each
forward gets a StepState (the session's KV cache, stats, pending slot grants, prefetch task).
Per layer, `route` (this session's attention and routing) and `experts` (fetch and compute)
are separate calls, so a batched step can later route several sessions and fetch their
union once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from flashmoe.stages.observer import ReadObserver
from flashmoe.models.loader import Resident
from flashmoe.runtime.dist import ExpertParallel
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.io_pool import IOPool
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.slot_pool import SlotGrant, SlotPool
from flashmoe.stages.attention import AttentionStage
from flashmoe.stages.cached_run import CachedRun
from flashmoe.stages.expert_compute import ExpertComputeStage
from flashmoe.stages.expert_fetch import ExpertFetchStage
from flashmoe.stages.expert_parallel import ExpertParallelStage
from flashmoe.stages.messages import Attended, Fetched, Routed, StepStats
from flashmoe.stages.prefetch import Prefetcher, guess_next
from flashmoe.stages.proxy_step import ProxyStep
from flashmoe.stages.router import RouterStage
from flashmoe.stages.sampling import Sampler, SamplingStage
from flashmoe.stages.speculate import Speculator


@dataclass(slots=True)
class StepState:
    """One forward's mutable state; the session that runs the step owns it."""

    cache: list[Any]
    stats: StepStats
    observer: ReadObserver | None = None
    read_experts: bool = True  # False: bench's compute-alone run (slots keep stale bytes)
    pending: list[tuple[SlotPool, SlotGrant]] = field(default_factory=list)  # not yet evaluated
    prefetch: Prefetcher | None = None
    speculate: bool = False  # a decode step may try the whole token at once (speculate.py)
    # a pure (greedy) sampler: a whole-token step samples in its own trip, and with lookahead
    # also builds and starts the next step before checking this one (speculate.Ahead)
    sampler: Callable[[mx.array], mx.array] | None = None
    lookahead: bool = False
    token: int | None = None  # set when the step sampled its token itself


class Pipeline:
    """Runs one forward step (a whole prompt, or one token) through the stages."""

    def __init__(self, resident: Resident, worker: MlxWorker, store: ExpertStore,
                 pools: dict[int, SlotPool], io: IOPool, k: int,
                 dtype: mx.Dtype | None = None, verify: bool = False,
                 prefetch: bool = False, parallel: ExpertParallel | None = None) -> None:
        self.r, self.worker, self.dtype = resident, worker, dtype
        fam = resident.family
        self.layers = fam.layers(resident.model)
        quant = {i: {p: (b, g, m) for p, b, g, m in le.quant}
                 for i, le in resident.experts.items()}
        self.attention = AttentionStage(fam)
        self.router = RouterStage(worker, fam, k)
        self.fetch = ExpertFetchStage(store, pools, io, verify)
        self.compute = ExpertComputeStage(worker, fam, pools, quant, resident.proxies)
        self.sampling = SamplingStage(worker)
        self.cached = CachedRun(self)
        self.prefetch, self.k = prefetch and parallel is None, k
        # an MlxLmFamily runs mlx-lm's own forward with proxied experts (no prefetch there)
        self.proxied = ProxyStep(self) if resident.proxies else None
        # several ranks: each fetches and computes its share, one all_sum per MoE layer
        self.parallel = parallel and ExpertParallelStage(parallel, worker, self.fetch,
                                                         self.compute, resident.num_experts)
        # one trip per token while every routed expert is in a slot (adapter families, 1 rank)
        self.speculator = Speculator(self) if not resident.proxies and parallel is None \
            else None

    async def forward(self, ids: list[int], step: StepState,
                      all_logits: bool = False, head: bool = True) -> mx.array | None:
        """Logits [1, L, V] (or [1, 1, V] for the last position) for `ids` after step.cache.

        head=False (a prefill step): only the caches are brought up to date, as mlx-lm's
        prefill evaluates only the cache states; the last layer's experts are not needed."""
        if self.proxied is not None:
            return await self.proxied.forward(ids, step, all_logits, head)
        speculates = self.speculates(step, len(ids), step.cache)
        ahead = None  # the step the last one started (used here, or undone)
        if speculates and not all_logits:
            ahead = self.speculator.take(step.cache, ids)
        elif self.speculator is not None:
            self.speculator.settle()
        if ahead is None:
            x0, masks = await self.worker.build(self._inputs, ids, step.cache)
        else:
            x0, masks = None, ahead.masks
        attend = self._attend(masks, step.cache)
        start = 0
        if speculates:
            pure = step.sampler if not all_logits else None
            got = await self.speculator(
                step, x0, attend, [[c] for c in step.cache], all_logits, ahead, pure,
                partial(self._next_inputs, step.cache)
                if pure and step.lookahead and self.speculator.lookahead else None)
            if got.logits is not None:
                step.token = got.token
                return got.logits
            start, x0 = got.layer, got.x
        if self.prefetch and len(ids) == 1:
            step.prefetch = Prefetcher(partial(self._fetch, step), self.fetch.pools)
        try:
            x_fn = await self.through_layers(step, x0, attend, start)
            if not head:
                t0 = time.perf_counter()
                await self.worker.run(lambda: [c.state for c in step.cache])
                step.stats.device_trip_ms += (time.perf_counter() - t0) * 1e3
                return None
            return await self.head_logits(step, x_fn, all_logits)
        finally:
            if step.prefetch is not None:
                await step.prefetch.cancel()
            self._release_pending(step)  # evaluated above, or abandoned on an error

    async def through_layers(self, step: StepState, x0: mx.array,
                             attend: Callable[[int, nn.Module, Callable[[], mx.array]],
                                              Callable[[], Attended]],
                             start: int = 0) -> Callable[[], mx.array]:
        """Layers start.. after x0 (layer start's input); attend(i, layer, x_fn) builds layer
        i's attention (a partial whose first argument is i). Returns the last layer's output,
        not yet evaluated."""
        x_fn: Callable[[], mx.array] = lambda: x0  # noqa: E731 - a chain of graph builders
        if step.prefetch is None and self.parallel is None:
            return await self._through_cached(step, x_fn, attend, start)
        for i, layer in enumerate(self.layers):
            if i < start:
                continue
            att_fn = attend(i, layer, x_fn)
            block = self.r.family.moe_block(layer)
            if block is None:
                x_fn = partial(self._dense, layer, att_fn)
                continue
            att, routed = await self.route(step, att_fn, block)
            x_fn = await self.experts(step, att, routed, block)
        return x_fn

    async def _through_cached(self, step: StepState, x_fn: Callable[[], mx.array],
                              attend: Callable, start: int) -> Callable[[], mx.array]:
        """Cached layers run in one MLX-thread job (CachedRun); a layer with a miss comes
        back here for the fetch and compute stages, then the job resumes after it."""
        i = start
        while True:
            i, x_fn, miss = await self.worker.build(self.cached, step, i, x_fn, attend)
            if miss is None:
                return x_fn
            att, routed, block = miss
            x_fn = await self.experts(step, att, routed, block)
            i += 1

    async def head_logits(self, step: StepState, x_fn: Callable[[], mx.array],
                          all_logits: bool = False) -> mx.array:
        """The last trip: the last layer's experts, final norm and lm head."""
        t0 = time.perf_counter()
        logits = await self.worker.run(lambda: self._head(x_fn(), all_logits))
        step.stats.device_trip_ms += (time.perf_counter() - t0) * 1e3
        return logits

    def speculates(self, step: StepState, tokens: int, caches: list[Any]) -> bool:
        """Whether a decode step tries the whole token at once (stages/speculate.py)."""
        return (self.speculator is not None and step.speculate and tokens == 1
                and step.read_experts and not self.prefetch and self.speculator.usable(caches))

    def release(self, step: StepState) -> None:
        """Unpin the step's slot grants (after the evaluation that read them, or on an error)."""
        self._release_pending(step)

    async def embed(self, ids: list[int]) -> mx.array:
        return await self.worker.build(self._embed, ids)

    async def sample(self, logits: mx.array, sampler: Sampler, stats: StepStats) -> int:
        return await self.sampling(logits, sampler, stats)

    async def route(self, step: StepState, att_fn: Callable[[], Attended],
                    block: nn.Module) -> tuple[Attended, Routed]:
        """One session's attention and routing for a layer (one device trip)."""
        layer = att_fn.args[0]
        att, routed = await self.router(att_fn, block, step.stats, self._guesser(step, layer))
        self._release_pending(step)  # the routing evaluation consumed the previous layer's slots
        return att, routed

    async def experts(self, step: StepState, att: Attended, routed: Routed,
                      block: nn.Module) -> Callable[[], mx.array]:
        """Fetch the routed experts and build (or, chunked, compute) the layer's output."""
        stats = step.stats
        if step.prefetch is not None:
            await step.prefetch.settle(att.layer, routed.experts, stats)
        act = block.switch_mlp.activation
        if self.parallel is not None:
            x = await self.parallel(partial(self._fetch, step), att, routed, act, stats)
            return lambda: x
        chunks = self.fetch.plan(att.layer, routed.experts)
        if len(chunks) == 1:
            fetched = await self._fetch(step, att.layer, chunks[0], stats)
            if routed.guess is not None:  # read the next layer's guess while this one computes
                step.prefetch.start(att.layer + 1, routed.guess, stats)
            x_fn = self.compute.whole(att, routed, fetched, act)
            step.pending.append((self.fetch.pools[att.layer], fetched.grant))
            return x_fn
        # the union exceeds the slots: chunk by chunk, each chunk's slots released after use
        stats.chunks += len(chunks)
        y = None
        for chunk in chunks:
            fetched = await self._fetch(step, att.layer, chunk, stats)
            y = await self.compute.partial(att, routed, fetched, y, act, stats)
        x = await self.compute.finish(att, routed, y, stats)
        return lambda: x

    async def _fetch(self, step: StepState, layer: int, experts: list[int],
                     stats: StepStats) -> Fetched:
        return await self.fetch(layer, experts, stats, observer=step.observer,
                                read=step.read_experts)

    def _release_pending(self, step: StepState) -> None:
        for pool, grant in step.pending:
            pool.release(grant)
        step.pending.clear()

    def _guesser(self, step: StepState, index: int):
        """Prefetch (decode only): a function guessing the next MoE layer's experts."""
        nxt = index + 1
        if step.prefetch is None or nxt >= len(self.layers):
            return None
        fam, layer = self.r.family, self.layers[nxt]
        block = fam.moe_block(layer)
        if block is None:
            return None
        return lambda h: guess_next(fam, layer, block, h, self.k)

    def _dense(self, layer: nn.Module, att_fn: Callable[[], Attended]) -> mx.array:
        att = att_fn()
        return att.h + self.r.family.dense_mlp(layer, att.xn)

    def _attend(self, masks: list[Any], cache: list[Any]) -> Callable:
        """attend(i, layer, x_fn): a builder of layer i's Attended with this step's masks."""
        return lambda i, layer, x_fn: partial(
            self.attention.build, i, layer, x_fn, masks[i], cache[i])

    def _next_inputs(self, cache: list[Any], y: mx.array) -> tuple[mx.array, Callable, list]:
        """The next decode step's inputs from its token still on the device (MLX thread):
        what _inputs gives for [y] once this step's cache updates are in."""
        x0, masks = self._inputs_of(y.reshape(1, 1), cache)
        return x0, self._attend(masks, cache), masks

    def _inputs(self, ids: list[int], cache: list[Any]) -> tuple[mx.array, list[Any]]:
        return self._inputs_of(mx.array([ids]), cache)

    def _inputs_of(self, tokens: mx.array, cache: list[Any]) -> tuple[mx.array, list[Any]]:
        x0 = self._embed_tokens(tokens)
        return x0, self.r.family.masks(self.r.model, x0, cache)

    def _embed(self, ids: list[int]) -> mx.array:
        return self._embed_tokens(mx.array([ids]))

    def _embed_tokens(self, tokens: mx.array) -> mx.array:
        x = self.r.family.embed(self.r.model, tokens)
        return x if self.dtype is None else x.astype(self.dtype)

    def _head(self, x: mx.array, all_logits: bool) -> mx.array:
        if not all_logits:
            x = x[:, -1:, :]
        return self.r.family.head(self.r.model, x)
