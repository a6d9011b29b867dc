"""ExpertFetchStage: read the routed experts' bytes from the checkpoint into slots."""
from __future__ import annotations

from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.io_pool import IOPool, ReadJob
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.messages import Fetched, StepStats


class ExpertFetchStage:
    def __init__(self, store: ExpertStore, pools: dict[int, SlotPool], io: IOPool) -> None:
        self.store, self.pools, self.io = store, pools, io
        self.trace: list[list[tuple[int, int, int]]] | None = None  # bench: what was read
        self.skip_reads = False  # bench only: time compute alone (slots hold stale bytes)

    def plan(self, layer: int, experts: tuple[int, ...]) -> list[list[int]]:
        """Split a layer's expert union into chunks that fit the free slots.

        Cached experts go first so a long prompt's chunks start with no reads."""
        pool = self.pools[layer]
        room = pool.free_slots()
        cached = [e for e in experts if pool.cached(layer, e)]
        order = cached + [e for e in experts if not pool.cached(layer, e)]
        return [order[i:i + room] for i in range(0, len(order), room)]

    async def __call__(self, layer: int, experts: list[int], stats: StepStats) -> Fetched:
        pool = self.pools[layer]
        grant = pool.grant(layer, experts)
        jobs = []
        for e, s in grant.misses:
            parts = self.store.layers[layer].parts
            for part, rng, view in zip(parts, self.store.ranges(layer, e), pool.store.views(s)):
                jobs.append(ReadJob(self.store.fds[rng.file_id], rng.offset, view,
                                    f"layer {layer} expert {e} {part.key}"))
        if self.trace is not None and jobs:
            self.trace.append([(j.fd, j.offset, j.dest.nbytes) for j in jobs])
        if self.skip_reads:
            jobs = []
        try:
            nbytes, ms = await self.io.read(jobs)
        except BaseException:
            pool.release(grant, valid=False)  # never leave half-read bytes marked cached
            raise
        if not self.skip_reads:
            for _, s in grant.misses:
                pool.store.finish(s)
        stats.expert_fetch_ms += ms
        stats.bytes_read += nbytes
        stats.experts_fetched += len(grant.misses)
        stats.experts_hit += len(grant.slots) - len(grant.misses)
        return Fetched(layer, grant, nbytes, ms)
