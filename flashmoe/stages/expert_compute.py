"""ExpertComputeStage: gather_qmm over the fetched slots, weighted sum, shared expert, residual."""
from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
import numpy as np

from flashmoe.kernels.moe import Quant, gather_experts, scatter_pairs
from flashmoe.models import Family
from flashmoe.models.proxy import ExpertProxy
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.messages import Attended, Fetched, Routed, StepStats


class ExpertComputeStage:
    def __init__(self, worker: MlxWorker, family: Family, pools: dict[int, SlotPool],
                 quant: dict[int, Quant], proxies: dict[int, ExpertProxy] | None = None) -> None:
        self.worker, self.family, self.pools, self.quant = worker, family, pools, quant
        self.proxies = proxies or {}  # MlxLmFamily: the layer's own switch module over slots
        self.same_shapes = worker.device == "gpu"

    def whole(self, att: Attended, routed: Routed, fetched: Fetched,
              activation: Callable) -> Callable[[], mx.array]:
        """Every routed expert is in this one chunk: one SwitchGLU call, as mlx-lm does.

        Returns the builder of the layer's output; the next device trip builds and runs it,
        and the caller releases the slots once that evaluation has consumed them."""
        slots = _slot_ids(routed.inds, fetched.grant.slots)
        return lambda: self._whole(att, routed, slots, activation)

    def _whole(self, att: Attended, routed: Routed, slots: np.ndarray, activation: Callable):
        return self.output(att, mx.array(slots), routed.scores, routed.shared, activation)

    def output(self, att: Attended, slots: mx.array, scores: mx.array, shared: mx.array | None,
               activation: Callable) -> mx.array:
        """The layer's output from one gather over its slot stack (slots: uint32 [..., k]);
        the per-layer path and the Speculator both build exactly this."""
        w = self.pools[att.layer].store.weights()
        y = gather_experts(att.xn, slots, w, self.quant[att.layer], activation)
        return att.h + self.family.combine(y, scores, shared)

    async def partial(self, att: Attended, routed: Routed, fetched: Fetched, y: mx.array | None,
                      activation: Callable, stats: StepStats) -> mx.array:
        """One chunk of a union larger than the slots: fill the (token, k) rows it covers.

        With `same_shapes` (GPU backends) every chunk runs the whole layer's gather shape, as
        mlx-lm's one SwitchGLU call does, and keeps the rows it covers: there the kernel (and
        so the rounding) is chosen by the call's shape, and only the same shape is bit-exact.
        The CPU kernels give each row the same bits whatever the shape: only covered rows run."""
        t0 = time.perf_counter()
        flat = routed.inds.reshape(-1)
        covered = np.isin(flat, list(fetched.grant.slots))
        if self.same_shapes:
            filler = next(iter(fetched.grant.slots))  # uncovered pairs read any loaded slot
            slots = _slot_ids(np.where(covered, flat, filler), fetched.grant.slots)
            y = await self.worker.run(self._partial_same_shape, att, routed, covered,
                                      slots.reshape(routed.inds.shape), y, activation)
        else:
            pairs = np.flatnonzero(covered)
            slots = _slot_ids(flat[pairs], fetched.grant.slots)
            y = await self.worker.run(self._partial, att, routed, pairs, slots, y, activation)
        self.pools[att.layer].release(fetched.grant)
        stats.expert_compute_ms += (time.perf_counter() - t0) * 1e3
        return y

    def _partial_same_shape(self, att, routed, covered: np.ndarray, slots: np.ndarray, y,
                            activation):
        out = self._gather(att.layer, att.xn, mx.array(slots), activation)
        out = out.reshape(-1, out.shape[-1])  # [T*k, D]
        if y is None:
            y = mx.zeros_like(out)
        return mx.where(mx.array(covered)[:, None], out, y)

    def _partial(self, att, routed, pairs: np.ndarray, slots: np.ndarray, y, activation):
        k = routed.inds.shape[-1]
        xs = att.xn.reshape(-1, att.xn.shape[-1])[mx.array(pairs // k)]  # [P, D]
        out = self._gather(att.layer, xs, mx.array(slots)[:, None], activation)
        return scatter_pairs(y, routed.inds.size, mx.array(pairs), out[:, 0])  # [T*k, D]

    def _gather(self, layer: int, x: mx.array, slots: mx.array, activation: Callable | None
                ) -> mx.array:
        """[..., D] x, [..., k] slots -> [..., k, D]: the family's switch, or SwitchGLU's math."""
        if layer in self.proxies:
            return self.proxies[layer].compute(x, slots)
        w = self.pools[layer].store.weights()
        return gather_experts(x, slots, w, self.quant[layer], activation)

    async def finish(self, att: Attended, routed: Routed, y: mx.array,
                     stats: StepStats) -> mx.array:
        t0 = time.perf_counter()
        x = await self.worker.run(self._finish, att, routed, y)
        stats.expert_compute_ms += (time.perf_counter() - t0) * 1e3
        return x

    def _finish(self, att: Attended, routed: Routed, y: mx.array) -> mx.array:
        y = y.reshape(*routed.inds.shape, y.shape[-1])  # [B, L, k, D]
        return att.h + self.family.combine(y, routed.scores, routed.shared)


def _slot_ids(inds: np.ndarray, slots: dict[int, int]) -> np.ndarray:
    """Expert ids → slot ids (same shape), via a small lookup table."""
    table = np.zeros(max(slots) + 1, dtype=np.uint32)
    table[list(slots)] = list(slots.values())
    return table[inds]
