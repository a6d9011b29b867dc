"""Where each routed expert's bytes live: (layer, expert) → byte ranges in the checkpoint.

Expert e of a stacked tensor [E, ...] is the contiguous range start + e*row .. + row; in a
per-expert layout (old Mixtral / qwen2_moe uploads) it is a whole tensor of its own. Either way
an expert is one range per part (gate/up/down × weight/scales/biases[/bias]) that mlx-lm would
stack, in the original safetensors files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from flashmoe.errors import CheckpointError
from flashmoe.runtime.platform_io import no_readahead, open_uncached
from flashmoe.checkpoints.safetensors_index import TensorInfo

# safetensors dtype → the dtype a slot holds it in (bytes land unchanged)
STORAGE = {"U32": mx.uint32, "U8": mx.uint8, "BF16": mx.bfloat16, "F16": mx.float16,
           "F32": mx.float32}


@dataclass(frozen=True, slots=True)
class PartSpec:
    """One of an expert's tensors: `proj.field`, its per-expert shape and dtypes."""

    key: str
    shape: tuple[int, ...]
    dtype: mx.Dtype
    nbytes: int


@dataclass(frozen=True, slots=True)
class LayerExperts:
    """A layer's expert tensors and their quantization.

    sources[i] is part i's one stacked tensor, or one tensor per expert (unstacked layout)."""

    layer: int
    num_experts: int
    parts: tuple[PartSpec, ...]
    sources: tuple[tuple[TensorInfo, ...], ...]
    quant: tuple[tuple[str, int, int, str], ...]  # (proj, bits, group_size, mode)

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for src in self.sources for t in src)

    def locate(self, part: int, expert: int) -> tuple[Path, int]:
        """(file, offset) of one part of one expert; the size is parts[part].nbytes."""
        src = self.sources[part]
        if len(src) == 1:
            return src[0].file, src[0].start + expert * self.parts[part].nbytes
        return src[expert].file, src[expert].start

    @property
    def signature(self) -> tuple:
        """Layers with equal signatures can share slot arrays."""
        return (self.parts, self.quant)

    @property
    def expert_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True, slots=True)
class ByteRange:
    file_id: int
    offset: int
    nbytes: int


class ExpertStore:
    """Byte ranges of every (layer, expert), in the original safetensors or a packed layout;
    owns the read-only file descriptors (and uncached ones when io.direct is on: O_DIRECT,
    or F_NOCACHE on macOS)."""

    def __init__(self, layers: dict[int, LayerExperts], packed: dict | None = None,
                 direct: bool = False, readahead: bool = False) -> None:
        self.layers, self.packed, self.direct = layers, packed, direct
        self._ranges: dict[tuple[int, int], tuple[ByteRange, ...]] = {}
        if packed:
            files = sorted({pl.file for pl in packed.values()})
        else:
            files = sorted({t.file for le in layers.values() for t in le.tensors})
        self.files: list[Path] = files
        self.names = [f.name for f in files]  # for read labels, without a Path call per read
        self.sizes = [f.stat().st_size for f in files]
        self._file_ids = {f: i for i, f in enumerate(files)}
        self.fds = [os.open(f, os.O_RDONLY) for f in files]
        if not readahead:  # experts are random ranges: readahead reads neighbours nobody routed
            for fd in self.fds:
                no_readahead(fd)
        self.direct_fds = [open_uncached(f) for f in files] if direct else []

    def close(self) -> None:
        for fd in self.fds + self.direct_fds:
            os.close(fd)
        self.fds, self.direct_fds = [], []

    def ranges(self, layer: int, expert: int) -> tuple[ByteRange, ...]:
        """The expert's bytes, one range per part, in `parts` order (worked out once per
        expert: a fetch asks for every miss's ranges)."""
        key = (layer, expert)
        got = self._ranges.get(key)
        if got is None:
            got = self._ranges[key] = tuple(self._locate(layer, expert))
        return got

    def _locate(self, layer: int, expert: int) -> list[ByteRange]:
        le = self.layers[layer]
        if self.packed:
            pl = self.packed[layer]
            fid, pos = self._file_ids[pl.file], expert * pl.stride
            out = []
            for part in le.parts:
                out.append(ByteRange(fid, pos, part.nbytes))
                pos += part.nbytes
            return out
        out = []
        for i, part in enumerate(le.parts):
            file, offset = le.locate(i, expert)
            out.append(ByteRange(self._file_ids[file], offset, part.nbytes))
        return out

    def checksum(self, layer: int, expert: int) -> str | None:
        """The packed manifest's xxh64 of the expert's bytes (None without a packed layout)."""
        return self.packed[layer].checksums[expert] if self.packed else None

def layer_experts(layer: int, num_experts: int, parts: dict[str, tuple[TensorInfo, ...]],
                  quant: tuple[tuple[str, int, int, str], ...]) -> LayerExperts:
    """A layer's experts from each part's on-disk tensors (see models/layout.py).

    `parts` maps `proj.field` to one stacked [E, ...] tensor or E per-expert tensors."""
    specs, sources = [], []
    for key, src in parts.items():
        t = src[0]
        if t.dtype not in STORAGE:
            raise CheckpointError(f"{t.file}: tensor {t.name} has dtype {t.dtype}; expert "
                                  f"tensors are one of {', '.join(STORAGE)}")
        shape = t.shape[1:] if len(src) == 1 else t.shape
        nbytes = t.nbytes // num_experts if len(src) == 1 else t.nbytes
        for u in src[1:]:
            if u.shape != t.shape or u.dtype != t.dtype:
                raise CheckpointError(f"{u.file}: tensor {u.name} is {u.dtype}{list(u.shape)} "
                                      f"but {t.name} is {t.dtype}{list(t.shape)}; every expert "
                                      "of a layer has the same shape")
        specs.append(PartSpec(key, tuple(shape), STORAGE[t.dtype], nbytes))
        sources.append(tuple(src))
    return LayerExperts(layer, num_experts, tuple(specs), tuple(sources), quant)
