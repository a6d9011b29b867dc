"""ExpertFetchStage: read the routed experts' bytes from the checkpoint into slots."""
from __future__ import annotations

import asyncio
import time

from flashmoe.stages.observer import ReadObserver
from flashmoe.errors import ExpertReadError
from flashmoe.runtime.direct import DirectBounce
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime import cuda_copy
from flashmoe.runtime.cuda_copy import PinnedStaging
from flashmoe.runtime.io_pool import PAGE, IOPool, ReadJob, ReadLabel, coalesce
from flashmoe.checkpoints.packed import expert_hash
from flashmoe.runtime.slot_pool import SlotGrant, SlotPool
from flashmoe.stages.messages import Fetched, StepStats


# io.direct reads an expert with O_DIRECT only from this size on: a real model's (and synth's)
# 7 MB experts, where a cold buffered read costs several times the CPU (BENCHMARKS.md (i));
# small experts (the demo's 0.84 MB) stay buffered, so what the page cache holds is still
# served from it (all direct, the demo lost 0.87 -> 0.74 fetch_vs_probe). Per expert, not per
# range: a range-size threshold left synth's 128 KiB scales buffered and fell back to 0.69.
DIRECT_MIN_BYTES = 2**20


class ExpertFetchStage:
    def __init__(self, store: ExpertStore, pools: dict[int, SlotPool], io: IOPool,
                 verify: bool = False) -> None:
        self.store, self.pools, self.io, self.verify = store, pools, io, verify
        self._bounce: dict[int, list[DirectBounce]] = {}  # per pool: idle bounce buffers
        self._staging: dict[int, PinnedStaging] = {}  # CUDA: per pool

    def plan(self, layer: int, experts: tuple[int, ...]) -> list[list[int]]:
        """Split a layer's expert union into chunks that fit the free slots.

        Cached experts go first so a long prompt's chunks start with no reads."""
        pool = self.pools[layer]
        room = pool.free_slots()
        cached = [e for e in experts if pool.cached(layer, e)]
        order = cached + [e for e in experts if not pool.cached(layer, e)]
        return [order[i:i + room] for i in range(0, len(order), room)]

    async def __call__(self, layer: int, experts: list[int], stats: StepStats,
                       observer: ReadObserver | None = None, read: bool = True) -> Fetched:
        """read=False: bench's compute-alone run; the slots keep stale bytes."""
        pool = self.pools[layer]
        grant = pool.grant(layer, experts)
        direct = (self.store.direct and pool.cuda is None
                  and self.store.layers[layer].expert_nbytes >= DIRECT_MIN_BYTES)
        bounce = self._take_bounce(pool, layer, len(grant.misses)) if direct else None
        jobs = self._jobs(layer, pool, grant, bounce) if pool.cuda is None else []
        if observer is not None and jobs:
            observer.expert_reads(layer, [(j.fd, j.offset, j.nbytes) for j in jobs])
        try:
            if pool.cuda is not None and read:
                nbytes, ms = await self._read_staged(layer, pool, grant, observer)
            else:
                # io.direct: each bounce row is copied into its slot by the thread that read
                # it, as soon as it is in (part of the fetch's time)
                nbytes, ms = await self.io.read(jobs if read else [])
            if self.verify and read:
                self._check(layer, pool, grant)
        except BaseException:  # a cancelled fetch's reads may still land: its bounce is dropped
            pool.release(grant, valid=False)  # never leave half-read bytes marked cached
            raise
        if bounce is not None:  # every read into it has ended and been copied out
            self._bounce[id(pool)].append(bounce)
        if read:
            for _, s in grant.misses + grant.promoted:
                pool.store.finish(s)
        stats.expert_fetch_ms += ms
        stats.bytes_read += nbytes
        stats.experts_fetched += len(grant.misses)
        stats.experts_hit += len(grant.slots) - len(grant.misses) - len(grant.promoted)
        if grant.promoted:  # served by the host tier: a copy, no read
            stats.extra["experts_host_hit"] = (stats.extra.get("experts_host_hit", 0)
                                               + len(grant.promoted))
        return Fetched(layer, grant, nbytes, ms)

    def _jobs(self, layer: int, pool: SlotPool, grant: SlotGrant,
              bounce: DirectBounce | None) -> list[ReadJob]:
        jobs, plain = [], []
        parts = self.store.layers[layer].parts
        for row, (e, s) in enumerate(grant.misses):
            for i, (part, rng, view) in enumerate(zip(parts, self.store.ranges(layer, e),
                                                      pool.store.views(s))):
                what = ReadLabel(layer, e, part.key, self.store.names[rng.file_id])
                if bounce is not None and _aligned_end(rng) <= self.store.sizes[rng.file_id]:
                    jobs.append(bounce.job(self.store.direct_fds[rng.file_id], rng.offset, view,
                                           row, i, what))
                else:
                    plain.append(ReadJob(self.store.fds[rng.file_id], rng.offset, view, what))
        # not coalesced here: read sizes and counts stay the ones io.split was tuned on (the
        # CUDA staged path coalesces, its staging row being contiguous)
        return jobs + plain

    async def _read_staged(self, layer: int, pool: SlotPool, grant: SlotGrant,
                           observer: ReadObserver | None) -> tuple[int, float]:
        """CUDA: read misses into pinned staging rows and copy each row into its slot's
        device address on the copy stream as soon as that row's reads are done (the copies
        overlap the other rows' reads); synchronise before the slots are evaluated."""
        staging = self._staging.get(id(pool))
        if staging is None:
            staging = self._staging[id(pool)] = PinnedStaging(pool.cuda, pool.store.parts)
        nbytes, t0 = 0, time.perf_counter()
        misses = list(grant.misses)
        for i in range(0, len(misses), staging.rows):
            group = misses[i:i + staging.rows]
            pool.cuda.synchronize(down=False)  # the staging rows' previous copies have landed
            rows = [self._row_jobs(layer, pool, staging, r, e) for r, (e, _) in enumerate(group)]
            if observer is not None:
                observer.expert_reads(layer, [(j.fd, j.offset, j.nbytes)
                                              for jobs in rows for j in jobs])
            done = await asyncio.gather(
                *(self._read_row(pool, staging, r, s, jobs)
                  for (r, (_, s)), jobs in zip(enumerate(group), rows)),
                return_exceptions=True)  # every read ends before a row is reused
            errors = [d for d in done if isinstance(d, BaseException)]
            if errors:
                raise errors[0]
            nbytes += sum(done)
        # every fill of these slots, promotions included (MLX cannot wait on them); demotions
        # go on in the background, ordered before the next fill of their slots
        pool.cuda.synchronize(down=False)
        return nbytes, (time.perf_counter() - t0) * 1e3 if misses else 0.0

    def _row_jobs(self, layer: int, pool: SlotPool, staging: PinnedStaging, row: int,
                  e: int) -> list[ReadJob]:
        """Expert e's parts into staging row `row`, touching ranges as one read."""
        return coalesce([ReadJob(self.store.fds[rng.file_id], rng.offset, view,
                                 ReadLabel(layer, e, part.key, self.store.names[rng.file_id]))
                         for part, rng, view in zip(pool.store.parts,
                                                    self.store.ranges(layer, e),
                                                    staging.views(row))])

    async def _read_row(self, pool: SlotPool, staging: PinnedStaging, row: int, slot: int,
                        jobs: list[ReadJob]) -> int:
        got, _ = await self.io.read(jobs)
        cuda_copy.fill(pool.cuda, pool.copy_key(slot),
                       cuda_copy.copies(pool.store.spans(slot), staging.spans(row)))
        return got

    def _take_bounce(self, pool: SlotPool, layer: int, rows: int) -> DirectBounce:
        """An idle bounce buffer of at least `rows` rows for one fetch (fetches of one pool
        may overlap: each holds its own); a larger one replaces a too small one."""
        idle = self._bounce.setdefault(id(pool), [])
        for i, b in enumerate(idle):
            if b.n >= rows:
                return idle.pop(i)
        if idle:
            idle.pop()  # too small for this fetch: let it go rather than keep both
        return DirectBounce([p.nbytes for p in self.store.layers[layer].parts], max(rows, 1))

    def _check(self, layer: int, pool: SlotPool, grant: SlotGrant) -> None:
        """io.verify: each read expert must hash to the packed manifest's xxh64."""
        for e, s in grant.misses:
            want = self.store.checksum(layer, e)
            if want is not None and expert_hash(pool.store.views(s)) != want:
                rng = self.store.ranges(layer, e)[0]
                raise ExpertReadError(
                    f"checksum mismatch: layer {layer} expert {e} in "
                    f"{self.store.files[rng.file_id]} at offset {rng.offset} does not match the "
                    "packed manifest; the file is corrupt, re-run task=pack")


def _aligned_end(rng) -> int:
    """End of the page-aligned superset an O_DIRECT read of `rng` needs."""
    return -(-(rng.offset + rng.nbytes) // PAGE) * PAGE
