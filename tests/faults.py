"""Single faults injected at run time (class-level monkeypatches; nothing in the repo changes),
each at one layer and one step (one `Pipeline.forward`, counted from 0 per engine; see
tests/mutation.py for what each forward is), for the mutation score and for
tests that show a check can fail. `layer=None` / `step=None` fire everywhere, every time.

Kinds: wrong_expert (one routed (token, k) pair computed with another slot's expert),
early_release (a layer's slots released before the evaluation that reads them),
stale_slot (a miss served from the slot's old bytes), split_offset (one piece of a split read
written at a wrong offset), byte_flip (one byte of one fetched expert inverted),
wrong_table (the whole-token step, stages/speculate.py: one layer's expert -> slot table
rotated, so every expert that layer routes to is computed with another cached expert's slot;
it fires only when that layer is then served by the whole-token trip),
prefetch_unawaited (the next layer reads slots whose prefetch reads are still in flight),
eval_unawaited (MlxWorker.run starts an evaluation and returns before it completes, so slots
are released while it still reads them: the CPU analogue of a device still reading a slot).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator
from unittest import mock

import numpy as np

import mlx.core as mx

from flashmoe.runtime import io_pool
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.slot_pool import SlotGrant, SlotPool
from flashmoe.stages import expert_compute
from flashmoe.stages.expert_compute import ExpertComputeStage
from flashmoe.stages.expert_fetch import ExpertFetchStage
from flashmoe.stages.pipeline import Pipeline
from flashmoe.stages.prefetch import Prefetcher
from flashmoe.stages.speculate import Speculator
from tests.hostile import slot_bytes

KINDS = ("wrong_expert", "early_release", "stale_slot", "split_offset", "byte_flip",
         "wrong_table")
DECODE_ONLY = {"wrong_table"}  # kinds that can only fire in a decode step (never a prefill)


@dataclass(frozen=True)
class Fault:
    kind: str
    layer: int | None = None
    step: int | None = None
    seed: int = 0


@dataclass
class Injector:
    """Tracks the current step; says when the fault applies; records that it fired."""

    fault: Fault
    engine: Any = None  # set by attach(): the stale-slot check reads the checkpoint
    step: int = -1
    fired: int = 0
    main: Any = None  # the task running the forward (not a prefetch task)
    armed: Any = None  # wrong_expert: the grant whose slot lookup gets one wrong entry
    skip: set = field(default_factory=set)  # early_release: grants already released
    orphans: list = field(default_factory=list)  # prefetch_unawaited: reads left running
    what: str = ""  # byte_flip: where the byte was, for reports
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.fault.seed)

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def applies(self, layer: int, main_only: bool = True) -> bool:
        f = self.fault
        try:
            task = asyncio.current_task()
        except RuntimeError:  # the MLX thread: a forward's cached layers (stages/cached_run.py)
            task = self.main
        if main_only and task is not self.main:
            return False
        once = f.layer is not None and f.step is not None
        return (f.layer in (None, layer) and f.step in (None, self.step)
                and not (once and self.fired))


@contextlib.contextmanager
def inject(fault: Fault) -> Iterator[Injector]:
    """Patch the engine's classes for the duration; yields the Injector (call .attach)."""
    inj = Injector(fault)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(Pipeline, "forward", _forward(inj, Pipeline.forward)))
        for target, name, make in PATCHES[fault.kind]:
            stack.enter_context(mock.patch.object(target, name, make(inj, getattr(target, name))))
        yield inj


def _forward(inj: Injector, orig):
    async def forward(self, *args, **kwargs):
        inj.step += 1
        inj.main = asyncio.current_task()
        try:
            return await orig(self, *args, **kwargs)
        finally:  # reads a fault left running end before the engine closes
            orphans, inj.orphans = inj.orphans, []
            await asyncio.gather(*orphans, return_exceptions=True)
    return forward


# ---- wrong_expert ----------------------------------------------------------------------------
def _compute(inj: Injector, orig):
    def stage(self, att, routed, fetched, *args, **kwargs):
        if inj.applies(att.layer) and len(set(fetched.grant.slots.values())) > 1:
            inj.armed = fetched.grant.slots
        return orig(self, att, routed, fetched, *args, **kwargs)
    return stage


def _slot_ids(inj: Injector, orig):
    def lookup(inds, slots):
        out = orig(inds, slots)
        if inj.armed is slots:
            inj.armed, inj.fired = None, inj.fired + 1
            i = inj.rng.randrange(out.size)
            others = sorted(set(slots.values()) - {int(out.flat[i])})
            out.flat[i] = inj.rng.choice(others)
        return out
    return lookup


# ---- early_release ---------------------------------------------------------------------------
def _fetch_then_release(inj: Injector, orig):
    async def fetch(self, layer, experts, stats, **kwargs):
        fetched = await orig(self, layer, experts, stats, **kwargs)
        if inj.applies(layer):
            inj.fired += 1
            self.pools[layer].release(fetched.grant)  # before anything read the slots
            inj.skip.add(id(fetched.grant))
        return fetched
    return fetch


def _release_once(inj: Injector, orig):
    def release(self, grant, *args, **kwargs):
        if id(grant) in inj.skip:  # the pipeline's own, now second, release
            inj.skip.discard(id(grant))
            return None
        return orig(self, grant, *args, **kwargs)
    return release


# ---- stale_slot --------------------------------------------------------------------------------
def _grant_stale(inj: Injector, orig):
    def grant(self, layer, experts):
        g = orig(self, layer, experts)
        if not g.misses or not inj.applies(layer):
            return g
        for e, s in inj.rng.sample(list(g.misses), len(g.misses)):
            if _holds_other_bytes(inj.engine, self, layer, e, s):
                inj.fired += 1
                return SlotGrant(g.slots, tuple(m for m in g.misses if m != (e, s)))
        return g  # every candidate slot already held these exact bytes: not a fault here
    return grant


def _holds_other_bytes(engine: Any, pool: SlotPool, layer: int, expert: int, slot: int) -> bool:
    store = engine.store
    for rng, view in zip(store.ranges(layer, expert), pool.store.views(slot)):
        want = os.pread(store.fds[rng.file_id], rng.nbytes, rng.offset)
        if view.tobytes() != want:
            return True
    return False


# ---- split_offset ------------------------------------------------------------------------------
def _split(inj: Injector, orig):
    def split(job, n):
        pieces = orig(job, n)
        what = job.what
        if len(pieces) < 2 or not inj.applies(getattr(what, "layer", -1)):
            return pieces
        inj.fired += 1
        i = inj.rng.randrange(len(pieces))
        a = pieces[i].dest.__array_interface__["data"][0] - job.dest.__array_interface__["data"][0]
        size = pieces[i].dest.nbytes
        shift = inj.rng.randint(1, 64) * (-1 if i else 1)  # stays inside the job's buffer
        moved = replace(pieces[i], dest=job.dest[a + shift: a + shift + size])
        return pieces[:i] + [moved] + pieces[i + 1:]
    return split


# ---- byte_flip ---------------------------------------------------------------------------------
def _fetch_then_flip(inj: Injector, orig):
    async def fetch(self, layer, experts, stats, **kwargs):
        fetched = await orig(self, layer, experts, stats, **kwargs)
        if inj.applies(layer):
            inj.fired += 1
            pool = self.pools[layer]
            misses = [s for _, s in fetched.grant.misses]
            slot = inj.rng.choice(misses or sorted(fetched.grant.slots.values()))
            key, arr = inj.rng.choice(list(pool.store.weights().items()))
            raw = slot_bytes(arr, pool.n)[slot]
            i = inj.rng.randrange(raw.size)
            raw[i] ^= np.uint8(0xFF)
            inj.what = f"layer {layer} slot {slot} {key} byte {i} of {raw.size}"
        return fetched
    return fetch


# ---- wrong_table -------------------------------------------------------------------------------
def _speculate(inj: Injector, orig):
    async def call(self, step, *args, **kwargs):
        layer = inj.fault.layer
        if layer in self.moe and inj.applies(layer):
            inj.armed = layer
        try:
            got = await orig(self, step, *args, **kwargs)
        finally:
            armed, inj.armed = inj.armed, None
        if armed is not None and (got.logits is not None or got.layer > armed):
            inj.fired += 1  # the rotated table's layer was served, not rolled back
        return got
    return call


def _table(inj: Injector, orig):
    def table(self, layer, where):
        out = orig(self, layer, where)
        if inj.armed != layer:
            return out
        held = np.flatnonzero(where >= 0)
        if len(held) < 2:
            return out
        rotated = where.copy()
        rotated[held] = np.roll(where[held], 1)
        return mx.array(np.maximum(rotated, 0).astype(np.uint32))
    return table


# ---- prefetch_unawaited (a concurrency self-check, not in KINDS) --------------------------------
def _settle_without_waiting(inj: Injector, orig):
    async def settle(self, layer, actual, stats):
        if self._task is not None and inj.applies(layer):
            inj.fired += 1
            inj.orphans.append(self._task)  # the reads go on; the fetch finds them "cached"
            self._task = None
        return await orig(self, layer, actual, stats)
    return settle


# ---- eval_unawaited (a concurrency self-check, not in KINDS) ------------------------------------
def _eval_async(inj: Injector, orig):
    def run(fn, args):
        out = fn(*args)
        inj.fired += 1
        mx.async_eval(out)  # returns at once; the CPU stream evaluates behind the caller's back
        return out
    return staticmethod(run)


PATCHES: dict[str, list] = {
    "none": [],
    "wrong_expert": [(ExpertComputeStage, "whole", _compute),
                     (ExpertComputeStage, "partial", _compute),
                     (expert_compute, "_slot_ids", _slot_ids)],
    "early_release": [(ExpertFetchStage, "__call__", _fetch_then_release),
                      (SlotPool, "release", _release_once)],
    "stale_slot": [(SlotPool, "grant", _grant_stale)],
    "split_offset": [(io_pool, "split_job", _split)],
    "byte_flip": [(ExpertFetchStage, "__call__", _fetch_then_flip)],
    "wrong_table": [(Speculator, "__call__", _speculate), (Speculator, "_table", _table)],
    "prefetch_unawaited": [(Prefetcher, "settle", _settle_without_waiting)],
    "eval_unawaited": [(MlxWorker, "_eval", _eval_async)],
}
