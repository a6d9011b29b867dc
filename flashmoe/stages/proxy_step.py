"""One forward of an MlxLmFamily: mlx-lm's own model call, its experts served from slots.

The model's whole forward is built lazily once (no evaluation, no waiting): each layer's
ExpertProxy records the (x, indices) its block's own router produced and returns a lazy
output. Then, layer by layer, one device trip evaluates only that layer's indices (and with
them the previous layer's output), the union is fetched into slots, and the host writes
where each expert landed into the layer's expert -> slot table, an evaluated uint32 array
the lazy output already reads through (the same zero-copy write as the slot bytes). The
next trip evaluates the layer's output with it.

A layer whose union might not fit its pool (min(pairs, experts) > slots, long prompts on a
small budget) cannot be one gather: its proxy returns a buffer instead, filled chunk by chunk
with ExpertComputeStage.partial (GPU: the whole layer's gather shape) before the next trip.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from flashmoe.models.proxy import ExpertProxy
from flashmoe.stages.messages import Attended, Routed

@dataclass(slots=True)
class Record:
    """What a layer's proxy saw during the build, and how its output will be served."""

    x: mx.array  # [..., D] the switch input
    inds: mx.array  # [..., k] expert ids from the block's own router
    buffer: mx.array | None = None  # chunked: the output, written by the host


class ProxyStep:
    """Runs Pipeline.forward for a Resident with proxies (see the module docstring)."""

    def __init__(self, pipeline: Any) -> None:
        self.p = pipeline
        self.proxies: dict[int, ExpertProxy] = pipeline.r.proxies
        for i, proxy in self.proxies.items():
            proxy.bind(pipeline.fetch.pools[i].store.weights())
        self.tables: dict[int, tuple[mx.array, np.ndarray]] = {}  # layer -> (array, view)

    async def forward(self, ids: list[int], step: Any, all_logits: bool, head: bool
                      ) -> mx.array | None:
        p, stats = self.p, step.stats
        records: dict[int, Record] = {}
        logits = await p.worker.build(self._build, ids, step.cache, records)
        try:
            for i in self.proxies:
                t0 = time.perf_counter()
                rec = records.pop(i)  # dropped once served: a chunked buffer is freed
                (inds,) = await p.worker.numpy(lambda r=rec: (r.inds,))
                p._release_pending(step)  # this trip consumed the previous layer's slots
                t1 = time.perf_counter()
                experts = tuple(int(e) for e in np.unique(inds))
                stats.device_trip_ms += (t1 - t0) * 1e3
                stats.route_host_ms += (time.perf_counter() - t1) * 1e3
                await self._serve(step, i, rec, inds, experts)
            t0 = time.perf_counter()
            if not head:
                await p.worker.run(lambda: [c.state for c in step.cache])
                out = None
            else:
                out = await p.worker.run(lambda: logits if all_logits else logits[:, -1:, :])
            stats.device_trip_ms += (time.perf_counter() - t0) * 1e3
            return out
        finally:
            p._release_pending(step)

    async def _serve(self, step: Any, i: int, rec: Record, inds: np.ndarray,
                     experts: tuple[int, ...]) -> None:
        p = self.p
        chunks = p.fetch.plan(i, experts)
        if rec.buffer is None:  # one gather through the table, in the next trip
            assert len(chunks) == 1, "built as one gather but the union needs chunks"
            fetched = await p._fetch(step, i, chunks[0], step.stats)
            view = self.tables[i][1]
            for e, s in fetched.grant.slots.items():
                view[e] = s
            step.pending.append((p.fetch.pools[i], fetched.grant))
            return
        att = Attended(i, rec.x, rec.x)
        routed = Routed(i, inds, rec.x, experts, None)
        if len(chunks) > 1:
            step.stats.chunks += len(chunks)
        y = None
        for chunk in chunks:
            fetched = await p._fetch(step, i, chunk, step.stats)
            y = await p.compute.partial(att, routed, fetched, y, None, step.stats)
        await p.worker.build(_write, rec.buffer, y)
        rec.buffer = None

    def _build(self, ids: list[int], cache: list[Any], records: dict[int, Record]) -> mx.array:
        """The model's own forward, lazily; fills `records` (MLX thread)."""
        def serve(proxy: ExpertProxy, x: mx.array, inds: mx.array) -> mx.array:
            i = proxy.layer
            pool = self.p.fetch.pools[i]
            rec = records[i] = Record(x, inds)
            if min(inds.size, self.p.r.num_experts) <= pool.n:
                return proxy.compute(x, self._table(i)[inds])
            dtype = proxy.compute(x, inds).dtype  # lazy, never evaluated: the output dtype
            rec.buffer = _buffer((*inds.shape, x.shape[-1]), dtype)
            return rec.buffer

        for proxy in self.proxies.values():
            proxy.set_serve(serve)
        return self.p.r.model(mx.array([ids]), cache=cache)

    def _table(self, layer: int) -> mx.array:
        """The layer's expert -> slot table (evaluated once; the host writes its view)."""
        if layer not in self.tables:
            arr = mx.zeros((self.p.r.num_experts,), dtype=mx.uint32)
            mx.eval(arr)
            self.tables[layer] = (arr, np.frombuffer(memoryview(arr), dtype=np.uint32))
        return self.tables[layer][0]


def _buffer(shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """A fresh evaluated output buffer (chunked layers only); freed once consumed."""
    buf = mx.zeros(shape, dtype=dtype)
    mx.eval(buf)
    return buf


def _write(buf: mx.array, y: mx.array) -> None:
    """Copy the chunked layer's output y [T*k, D] into its buffer's memory (MLX thread)."""
    y = mx.contiguous(y.reshape(buf.shape).astype(buf.dtype))
    mx.eval(y)
    dst = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    dst[:] = np.frombuffer(memoryview(y).cast("B"), dtype=np.uint8)
