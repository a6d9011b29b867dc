"""Preallocated MLX slot arrays that experts are read into, doubling as the expert cache.

A slot is pinned from the moment a fetch is planned into it until the computation that
reads it has been evaluated; only unpinned slots are ever overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import mlx.core as mx
import numpy as np

from flashmoe.runtime.cuda_copy import CudaCopy, Spans, address
from flashmoe.runtime.eviction import Eviction
from flashmoe.runtime.expert_store import LayerExperts
from flashmoe.runtime.host_tier import HostTier


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """Slots for a chunk of one layer's experts; `misses` still need reading."""

    slots: dict[int, int]  # expert -> slot
    misses: tuple[tuple[int, int], ...]  # (expert, slot) to fetch
    promoted: tuple[tuple[int, int], ...] = ()  # (expert, slot) copied in from the host tier


def _bf16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    """Exact: a bf16 is the top half of the f32 with the same value."""
    dst.view(np.uint32)[:] = src.view(np.uint16).astype(np.uint32) << 16


def _f16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    dst.view(np.float32)[:] = src.view(np.float16)


UPCAST = {mx.bfloat16: _bf16_to_f32, mx.float16: _f16_to_f32}


def _resident(shape: tuple[int, int]) -> np.ndarray:
    """Zeroed bytes whose pages are written now, as mx.zeros' are. np.zeros' untouched pages
    would each fault inside the pread that first fills them: on the 2-core box that doubled
    the CPU time of a cold 131 KB scales read (BENCHMARKS.md, read path 2026-12-01)."""
    out = np.empty(shape, dtype=np.uint8)
    out.fill(0)
    return out


class SlotArrays:
    """[n, ...] arrays per expert part in the kernel's dtype, plus writable byte views.

    With `upcast` (f32 activations), bf16/f16 scales and biases are read into a staging
    buffer and widened into f32 slots, so no kernel call converts a whole slot stack."""

    def __init__(self, spec: LayerExperts, n: int, upcast: bool = False) -> None:
        self.parts = spec.parts
        self._convert = [UPCAST.get(p.dtype) if upcast else None for p in spec.parts]
        dtypes = [mx.float32 if c else p.dtype for p, c in zip(spec.parts, self._convert)]
        self.arrays = {p.key: mx.zeros((n, *p.shape), dtype=d) for p, d in zip(spec.parts, dtypes)}
        mx.eval(list(self.arrays.values()))
        # zero-copy: byte views over MLX memory (cast("B") also works for bfloat16, which
        # numpy cannot name); preads land directly in the arrays the kernels read
        self._bytes = [np.frombuffer(memoryview(self.arrays[p.key]).cast("B"), dtype=np.uint8)
                       .reshape(n, -1) for p in spec.parts]
        self._staging = [_resident((n, p.nbytes)) if c else None
                         for p, c in zip(spec.parts, self._convert)]
        self.upcasts = any(c is not None for c in self._convert)
        self._spans = [(address(b), b.strides[0], b.shape[1]) for b in self._bytes]

    def spans(self, slot: int) -> Spans:
        """(address, bytes) of each part's slot memory: the CUDA copy path's ends (which
        never runs with upcast parts: those are widened on the host)."""
        return [(a + slot * stride, n) for a, stride, n in self._spans]

    def views(self, slot: int) -> list[np.ndarray]:
        """Where each part's file bytes should land for `slot`."""
        return [b[slot] if st is None else st[slot] for b, st in zip(self._bytes, self._staging)]

    def finish(self, slot: int) -> None:
        """After the reads of `slot`: widen staged parts into their f32 slots."""
        for conv, st, b in zip(self._convert, self._staging, self._bytes):
            if conv is not None:
                conv(st[slot], b[slot])

    @property
    def nbytes(self) -> int:
        extra = sum(st.nbytes for st in self._staging if st is not None)
        return sum(a.nbytes for a in self.arrays.values()) + extra

    def weights(self) -> dict[str, mx.array]:
        return self.arrays


class SlotPool:
    """`n` slots shared by layers with one signature; maps (layer, expert) to slots.

    Bookkeeping per grant and release is O(1) for lru/none and O(log n) for lfu (eviction.py):
    at the H200's ~14,500 slots a scan per miss would cost milliseconds."""

    def __init__(self, spec: LayerExperts, n: int, policy: str = "lru",
                 upcast: bool = False, host: HostTier | None = None,
                 cuda: CudaCopy | None = None, clean_ahead: int = 0) -> None:
        self.n, self.policy = n, policy
        self.store = SlotArrays(spec, n, upcast)
        self.host = host if host is not None and host.n and policy != "none" else None
        # the CUDA copy path (cuda_copy.select), or None: slots widened on the host (upcast
        # parts) are filled by the host, and so is their host tier
        self.cuda = cuda if not self.store.upcasts else None
        if self.host is not None:
            self.host.copy_with(self.cuda)
        self._owner: list[tuple[int, int] | None] = [None] * n
        self._table: dict[tuple[int, int], int] = {}
        self._pins = [0] * n
        self._free = n  # slots with no pins
        self._order = Eviction(n, policy)
        self._uses: dict[tuple[int, int], int] = {}
        self._where: dict[int, np.ndarray] = {}  # layer -> expert -> slot, -1: not on device
        self.changes: dict[int, int] = {}  # layer -> how many times its `where` map changed
        self.hits = self.misses = 0
        # lru with a host tier: how many of the next victims keep a host copy (_clean_ahead)
        self.clean_ahead = min(clean_ahead, n // 4) if self.host and policy == "lru" else 0

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + (self.host.nbytes if self.host is not None else 0)

    @property
    def host_hits(self) -> int:
        return self.host.hits if self.host is not None else 0

    @property
    def host_demotions(self) -> tuple[int, int]:
        """(demotions copied out to the host tier, demotions of a kept copy: none copied)."""
        return (self.host.demoted, self.host.kept) if self.host is not None else (0, 0)

    @property
    def host_stashed(self) -> int:
        """Copies out made ahead of an eviction (_clean_ahead)."""
        return self.host.stashed if self.host is not None else 0

    def free_slots(self) -> int:
        return self._free

    def clear(self) -> None:
        """Forget every cached expert (a cold start), in both tiers; counters keep running."""
        if self.host is not None:
            self.host.clear()
        for s in range(self.n):
            if self._pins[s] == 0:
                self._forget(s)
                self._order.unpinned(s, True, 0)

    def cached(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._table

    def servable(self, layer: int, experts) -> bool:
        """Whether a grant of `experts` needs no read: each is in a slot or in the host tier,
        and the tier has spare rows for every demotion the grant may make (none of those
        experts is then dropped from it before its promotion)."""
        away = [e for e in experts if (layer, e) not in self._table]
        if not away:
            return True
        host = self.host
        return (host is not None and host.spare() >= len(away)
                and all((layer, e) in host for e in away))

    def where(self, layer: int, num_experts: int) -> np.ndarray:
        """The layer's expert -> slot map (int32, -1 where the expert is not in a slot), kept
        up to date in O(1) per change from its first call on; callers must not write it.

        A slot enters the map when granted, before its read completes: it is only a cache
        answer between steps, when no read is in flight (the model's step lock)."""
        if layer not in self._where:
            arr = np.full(num_experts, -1, dtype=np.int32)
            for (lay, e), s in self._table.items():
                if lay == layer:
                    arr[e] = s
            self._where[layer] = arr
        return self._where[layer]

    def grant(self, layer: int, experts: list[int]) -> SlotGrant:
        """Pin a slot for each expert (reusing cached ones); len(experts) <= free slots."""
        assert len(experts) <= self._free, "caller must chunk to the free slots"
        slots, misses, promoted = {}, [], []
        for e in experts:
            key = (layer, e)
            self._uses[key] = self._uses.get(key, 0) + 1
            s = self._table.get(key)
            if s is None:
                s = self._order.victim(self._pins, self._owner)
                if self._move(s, key):
                    promoted.append((e, s))
                else:
                    misses.append((e, s))
                    self.misses += 1
            else:
                self.hits += 1
            if self._pins[s] == 0:
                self._free -= 1
            self._pins[s] += 1
            self._order.granted(s)
            slots[e] = s
        if self.clean_ahead:
            self._clean_ahead()
        return SlotGrant(slots, tuple(misses), tuple(promoted))

    def _clean_ahead(self) -> None:
        """Copy the experts of the next `clean_ahead` victims (lru order) out to the host tier
        now, ahead of their eviction: their demotion is then free, and a promotion or read into
        their slot waits for no copy out. On CUDA the copies run on the device-to-host stream,
        beside this grant's copies in and the layers' compute; without it, a demotion's copy
        out is followed by the slot's refill on the critical path. Only while the tier has
        spare rows for twice the window: fewer, and the stashes would reclaim each other's."""
        host = self.host
        if host.spare() < 2 * self.clean_ahead:
            return
        for s in islice(self._order.oldest(), self.clean_ahead):
            key = self._owner[s]
            if key is not None and self._pins[s] == 0 and not host.has_copy(key):
                host.stash(key, self._parts(s), self.copy_key(s))

    def touch(self, layer: int, experts: list[int]) -> None:
        """Cached experts that a step used without a grant (the whole-token step, between
        steps: nothing pinned): the recency, use counts and hits a grant and its release
        would leave, without building the grant."""
        for e in experts:
            key = (layer, e)
            s = self._table[key]
            uses = self._uses[key] = self._uses.get(key, 0) + 1
            self.hits += 1
            self._order.granted(s)
            if self._pins[s] == 0:
                self._order.unpinned(s, False, uses)

    def release(self, grant: SlotGrant, valid: bool = True, keep: bool = False) -> None:
        """Unpin after the computation reading these slots was evaluated.

        keep: stay cached even under policy none (a prefetched expert not yet used)."""
        for e, s in grant.slots.items():
            self._pins[s] -= 1
            if not valid or (self.policy == "none" and not keep):
                self._forget(s)
            if self._pins[s] == 0:
                self._free += 1
                owner = self._owner[s]
                self._order.unpinned(s, owner is None, self._uses.get(owner, 0))

    def _move(self, s: int, key: tuple[int, int]) -> bool:
        """Give slot `s` to `key`: its expert is demoted to the host tier, and `key` promoted
        from there when it is held (True: no read needed). Copies run here, before any read
        of this grant can overwrite the slot."""
        old, host = self._owner[s], self.host
        row = host.take(key) if host is not None and key in host else None
        slot = self.copy_key(s)
        if host is not None and old is not None:  # after take: a full tier drops another
            host.demote(old, self._parts(s), slot)
        self._assign(s, key)
        if row is not None:
            host.copy_back(key, row, self._parts(s), slot)
            return True
        return False

    def _parts(self, s: int) -> list[np.ndarray] | Spans:
        """Slot s's parts as the host tier copies them: addresses on the CUDA copy path,
        numpy views elsewhere."""
        return self.store.spans(s) if self.cuda is not None else self.store.views(s)

    def copy_key(self, s: int) -> tuple[int, int]:
        """Slot s as the CUDA copy path names it (copies are ordered by slot and host row)."""
        return id(self), s

    def _assign(self, s: int, key: tuple[int, int]) -> None:
        self._forget(s)
        self._owner[s] = key
        self._table[key] = s
        if key[0] in self._where:
            self._where[key[0]][key[1]] = s
            self.changes[key[0]] = self.changes.get(key[0], 0) + 1

    def _forget(self, s: int) -> None:
        old = self._owner[s]
        if old is not None:
            self._table.pop(old, None)
            self._owner[s] = None
            if old[0] in self._where:
                self._where[old[0]][old[1]] = -1
                self.changes[old[0]] = self.changes.get(old[0], 0) + 1
