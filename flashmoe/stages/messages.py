"""The small typed messages the stages hand each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np


@dataclass(frozen=True, slots=True)
class Attended:
    """A layer's residual stream after attention (h) and its normed MLP input (xn)."""

    layer: int
    h: mx.array  # [B, L, D]
    xn: mx.array  # [B, L, D]


@dataclass(frozen=True, slots=True)
class Routed:
    """The router's choice for every token of the step."""

    layer: int
    inds: np.ndarray  # [B, L, k] expert ids
    scores: mx.array  # [B, L, k]
    experts: tuple[int, ...]  # the union, ascending: each fetched once
    shared: mx.array | None  # shared-expert output, evaluating while experts are read
    guess: np.ndarray | None = None  # prefetch: the next layer's likely experts


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk of the union, resident in slots."""

    layer: int
    grant: Any  # SlotGrant
    bytes_read: int
    fetch_ms: float


@dataclass(slots=True)
class StepStats:
    """Per-step (one forward) telemetry, summed over layers (README "Log keys").

    MLX evaluates lazily, so the work of several stages runs in one device trip; the trip has
    its own key rather than being charged to one stage."""

    device_trip_ms: float = 0.0  # per MoE layer: previous layer's experts + attention + router;
    # and the last trip: the last layer's experts + final norm + lm head
    route_host_ms: float = 0.0  # host side: routed ids -> the union of experts to fetch
    expert_fetch_ms: float = 0.0  # wall time of the expert reads (all I/O threads)
    expert_compute_ms: float = 0.0  # expert-only evaluations (a union larger than the slots)
    sampling_ms: float = 0.0
    bytes_read: int = 0
    experts_fetched: int = 0
    experts_hit: int = 0
    chunks: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def read_nothing(self) -> bool:
        """No expert came from disk or the host tier: the next decode step may try the
        whole token at once (stages/speculate.py)."""
        return self.experts_fetched == 0 and not self.extra.get("experts_host_hit")

    def as_dict(self) -> dict:
        return {
            "device_trip_ms": round(self.device_trip_ms, 3),
            "route_host_ms": round(self.route_host_ms, 3),
            "expert_fetch_ms": round(self.expert_fetch_ms, 3),
            "expert_compute_ms": round(self.expert_compute_ms, 3),
            "sampling_ms": round(self.sampling_ms, 3),
            "bytes_read": self.bytes_read,
            "experts_fetched": self.experts_fetched,
            "experts_hit": self.experts_hit,
            **self.extra,
        }
