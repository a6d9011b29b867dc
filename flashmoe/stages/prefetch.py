"""Speculative prefetch: guess layer l+1's experts from layer l's residual stream (layer
l+1's own router on it) and read them while layer l computes. Off by default: a wrong
guess costs a wasted read; the accuracy is logged per token (prefetch_hits/_issued)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flashmoe.models import Family
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.messages import Fetched, StepStats

Fetch = Callable[[int, list[int], StepStats], Awaitable[Fetched]]


def guess_next(family: Family, next_layer: nn.Module, block: nn.Module, h: mx.array,
               k: int) -> mx.array:
    """Layer l+1's router applied to layer l's post-attention residual: [.., k] expert ids."""
    inds, _ = family.route(block, family.mlp_input(next_layer, h), k)
    return inds


class Prefetcher:
    """At most one speculative read in flight; the next layer's fetch waits for it first."""

    def __init__(self, fetch: Fetch, pools: dict[int, SlotPool]) -> None:
        self.fetch, self.pools = fetch, pools
        self._task: asyncio.Task | None = None
        self._layer: int | None = None
        self._guess: set[int] = set()

    def start(self, layer: int, guess: np.ndarray, stats: StepStats) -> None:
        pool = self.pools[layer]
        wanted = [int(e) for e in np.unique(guess) if not pool.cached(layer, int(e))]
        wanted = wanted[: pool.free_slots()]
        self._layer, self._guess = layer, {int(e) for e in np.unique(guess)}
        if wanted:
            stats.extra["prefetch_issued"] = stats.extra.get("prefetch_issued", 0) + len(wanted)
            self._task = asyncio.create_task(self._read(layer, wanted, stats))

    async def _read(self, layer: int, experts: list[int], stats: StepStats) -> None:
        fetched = await self.fetch(layer, experts, stats)
        self.pools[layer].release(fetched.grant, keep=True)  # cached, not pinned

    async def settle(self, layer: int, actual: tuple[int, ...], stats: StepStats) -> None:
        """Wait for an in-flight guess (its slots must be whole before anyone reads them)."""
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self._layer == layer and self._guess:
            hits = len(self._guess & set(actual))
            stats.extra["prefetch_hits"] = stats.extra.get("prefetch_hits", 0) + hits
            stats.extra["prefetch_needed"] = stats.extra.get("prefetch_needed", 0) + len(actual)
        self._layer, self._guess = None, set()

    async def cancel(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
