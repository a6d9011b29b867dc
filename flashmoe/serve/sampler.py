"""Per-sequence sampling: mlx-lm's filters, each sequence with its own random key."""
from __future__ import annotations

import os

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class SeqSampler:
    """mlx-lm's make_sampler chain (top_p → min_p → top_k → categorical), but the key is the
    sequence's own, split once per token: a seeded request draws the same tokens whatever
    else is in the batch. Temperature 0 is greedy argmax, as in mlx-lm."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int | None = None) -> None:
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.seed = seed
        self._key: mx.array | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        """logprobs [1, V] → token id [1]; builds a graph (the caller evaluates it)."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, 1)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        if self._key is None:
            seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
            self._key = mx.random.key(seed)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=sub)
