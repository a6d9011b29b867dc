"""Stream synthetic tensors straight into sharded safetensors files, mlx-lm style.

Nothing is ever materialised as a whole model: each tensor is a `TensorSpec` whose `fill`
yields its bytes chunk by chunk, so peak memory is the random pool plus one chunk, and a
15 GB checkpoint writes at disk speed. Quantized weights are random bytes (any bit pattern is
a valid packed integer); scales and biases are real bf16 values picked so that the
dequantized matrix has zero mean and a chosen standard deviation (activations stay O(1)).
"""
from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB
CHUNK_BYTES = 8 << 20
_DTYPE_BYTES = {"U32": 4, "BF16": 2, "F32": 4}

Chunk = bytes | memoryview


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to write: its name, safetensors dtype, shape and a byte generator."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fill: Callable[[RandomSource], Iterable[Chunk]]
    params: int  # logical parameter count, for the index's total_parameters

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


class RandomSource:
    """Deterministic random bytes for a whole checkpoint, cheap enough to stream GBs.

    Weights are slices of one random pool at random offsets: no per-byte work, yet every
    expert (and every chunk) sees different bits. Scales and biases come from small pools
    keyed by the dequantized std so a `.scales` and its `.biases` always pair up.
    """

    def __init__(self, seed: int, pool_bytes: int = 64 << 20) -> None:
        self.seed = seed
        bitgen = np.random.SFC64(seed)  # ~5x faster than PCG64 for raw bytes
        self.pool = memoryview(bitgen.random_raw(pool_bytes // 8).view(np.uint8))
        self._affine: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}

    def rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

    def random_bytes(self, key: str, nbytes: int) -> Iterator[Chunk]:
        """`nbytes` of random bits (in 4-byte aligned chunks) for the tensor `key`."""
        rng, span = self.rng(key), min(CHUNK_BYTES, len(self.pool) // 4)
        for start in range(0, nbytes, span):
            n = min(span, nbytes - start)
            off = 4 * int(rng.integers(0, (len(self.pool) - n) // 4 + 1))
            yield self.pool[off:off + n]

    def affine(self, key: str, count: int, std: float, bits: int, part: str) -> Iterator[Chunk]:
        """bf16 `scales` or `biases` (part) for `count` groups of a quantized tensor `key`."""
        scales, biases = self._affine_pool(std, bits)
        src = memoryview((scales if part == "scales" else biases).view(np.uint8))
        rng, span = self.rng(key), len(scales) // 4
        for start in range(0, count, span):
            n = min(span, count - start)
            off = int(rng.integers(0, len(scales) - n + 1))
            yield src[2 * off:2 * (off + n)]

    def _affine_pool(self, std: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
        if (std, bits) not in self._affine:
            levels = 2**bits
            q_mean, q_std = (levels - 1) / 2, math.sqrt((levels * levels - 1) / 12)
            jitter = self.rng(f"affine/{std}/{bits}").uniform(0.75, 1.25, 1 << 20)
            scales = to_bf16(std / q_std * jitter)
            biases = to_bf16(-q_mean * from_bf16(scales))  # w = s*q + b has mean 0
            self._affine[(std, bits)] = (scales, biases)
        return self._affine[(std, bits)]


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def quantized(
    name: str, lead: tuple[int, ...], out_dim: int, in_dim: int, *, bits: int,
    group_size: int, std: float,
) -> list[TensorSpec]:
    """`name`.{weight,scales,biases} of an affine-quantized linear (stacked over `lead`).

    Dequantized weights have mean 0 and standard deviation `std`.
    """
    assert (in_dim * bits) % 32 == 0 and in_dim % group_size == 0, (name, in_dim)
    rows = lead + (out_dim,)
    groups = rows + (in_dim // group_size,)
    count = math.prod(groups)
    return [
        TensorSpec(f"{name}.weight", "U32", rows + (in_dim * bits // 32,),
                   lambda src: src.random_bytes(name, math.prod(rows) * in_dim * bits // 8),
                   math.prod(rows) * in_dim),
        TensorSpec(f"{name}.scales", "BF16", groups,
                   lambda src: src.affine(name, count, std, bits, "scales"), 0),
        TensorSpec(f"{name}.biases", "BF16", groups,
                   lambda src: src.affine(name, count, std, bits, "biases"), 0),
    ]


def dense(
    name: str, shape: tuple[int, ...], sample: Callable[[np.random.Generator, int], np.ndarray],
    dtype: str = "BF16",
) -> TensorSpec:
    """A small unquantized tensor whose float values `sample(rng, size)` returns."""
    def fill(src: RandomSource) -> Iterator[Chunk]:
        values = np.asarray(sample(src.rng(name), math.prod(shape)), dtype=np.float32)
        yield (to_bf16(values) if dtype == "BF16" else values).tobytes()

    return TensorSpec(name, dtype, shape, fill, math.prod(shape))


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Split like mlx_lm.utils.make_shards: a new shard when the next tensor would overflow."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(specs: Sequence[TensorSpec]) -> bytes:
    """8-byte length + JSON header, space-padded so the data starts 8-byte aligned."""
    entries: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_checkpoint(
    path: Path, specs: Sequence[TensorSpec], *, seed: int = 0, progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES, label: str = "writing checkpoint",
) -> int:
    """Write `specs` as mlx-lm shards + model.safetensors.index.json; returns bytes written."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    src = RandomSource(seed)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    # stderr only: stdout carries generated text
    with Progress(*columns, console=Console(file=sys.stderr), disable=not progress) as bar:
        task = bar.add_task(label, total=total)
        for name, shard in zip(names, shards):
            _write_shard(path / name, shard, src, lambda n: bar.advance(task, n))
    index = {
        "metadata": {"total_size": total, "total_parameters": sum(s.params for s in specs)},
        "weight_map": dict(sorted((s.name, n) for n, sh in zip(names, shards) for s in sh)),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return total


def _write_shard(
    file: Path, specs: Sequence[TensorSpec], src: RandomSource, advance: Callable[[int], None]
) -> None:
    header = safetensors_header(specs)
    with open(file, "wb") as f:
        f.write(header)
        for spec in specs:
            written = 0
            for chunk in spec.fill(src):
                f.write(chunk)
                written += len(chunk)
                advance(len(chunk))
            assert written == spec.nbytes, (spec.name, written, spec.nbytes)
