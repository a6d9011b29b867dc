"""Preallocated MLX slot arrays that experts are read into, doubling as the expert cache.

A slot is pinned from the moment a fetch is planned into it until the computation that
reads it has been evaluated; only unpinned slots are ever overwritten.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flashmoe.errors import ConfigError
from flashmoe.runtime.expert_store import LayerExperts

POLICIES = ("none", "lru", "lfu")


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """Slots for a chunk of one layer's experts; `misses` still need reading."""

    slots: dict[int, int]  # expert -> slot
    misses: tuple[tuple[int, int], ...]  # (expert, slot) to fetch


class SlotArrays:
    """[n, ...] storage arrays per expert part, plus writable byte views of each slot."""

    def __init__(self, spec: LayerExperts, n: int) -> None:
        self.parts = spec.parts
        self.arrays = {p.key: mx.zeros((n, *p.shape), dtype=p.storage) for p in spec.parts}
        mx.eval(list(self.arrays.values()))
        # zero-copy: numpy views over MLX memory; preads land directly in the arrays
        self._bytes = [np.asarray(memoryview(self.arrays[p.key])).reshape(n, -1).view(np.uint8)
                       for p in spec.parts]

    def views(self, slot: int) -> list[np.ndarray]:
        return [b[slot] for b in self._bytes]

    def weights(self) -> dict[str, mx.array]:
        """Arrays as the kernel wants them (bf16 parts are stored as uint16)."""
        return {p.key: (a if p.storage == p.dtype else a.view(p.dtype))
                for p, a in zip(self.parts, self.arrays.values())}


class SlotPool:
    """`n` slots shared by layers with one signature; maps (layer, expert) to slots."""

    def __init__(self, spec: LayerExperts, n: int, policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ConfigError(f"cache.policy={policy} must be one of {', '.join(POLICIES)}")
        self.n, self.policy = n, policy
        self.store = SlotArrays(spec, n)
        self._owner: list[tuple[int, int] | None] = [None] * n
        self._table: dict[tuple[int, int], int] = {}
        self._pins = [0] * n
        self._recency: OrderedDict[int, None] = OrderedDict((s, None) for s in range(n))
        self._uses: dict[tuple[int, int], int] = {}
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.store.arrays.values())

    def free_slots(self) -> int:
        return sum(1 for p in self._pins if p == 0)

    def cached(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._table

    def grant(self, layer: int, experts: list[int]) -> SlotGrant:
        """Pin a slot for each expert (reusing cached ones); len(experts) <= free slots."""
        assert len(experts) <= self.free_slots(), "caller must chunk to the free slots"
        slots, misses = {}, []
        for e in experts:
            key = (layer, e)
            self._uses[key] = self._uses.get(key, 0) + 1
            s = self._table.get(key)
            if s is None:
                s = self._victim()
                self._assign(s, key)
                misses.append((e, s))
                self.misses += 1
            else:
                self.hits += 1
            self._pins[s] += 1
            self._recency.move_to_end(s)
            slots[e] = s
        return SlotGrant(slots, tuple(misses))

    def release(self, grant: SlotGrant, valid: bool = True) -> None:
        """Unpin after the computation reading these slots was evaluated."""
        for e, s in grant.slots.items():
            self._pins[s] -= 1
            if not valid or self.policy == "none":
                self._forget(s)

    def _victim(self) -> int:
        free = [s for s in self._recency if self._pins[s] == 0]
        empty = [s for s in free if self._owner[s] is None]
        if empty:
            return empty[0]
        if self.policy == "lfu":
            return min(free, key=lambda s: self._uses.get(self._owner[s], 0))
        return free[0]  # least recently used among unpinned

    def _assign(self, s: int, key: tuple[int, int]) -> None:
        self._forget(s)
        self._owner[s] = key
        self._table[key] = s

    def _forget(self, s: int) -> None:
        old = self._owner[s]
        if old is not None:
            self._table.pop(old, None)
            self._owner[s] = None
