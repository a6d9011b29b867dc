"""Where each routed expert's bytes live: (layer, expert) → byte ranges in the checkpoint.

Expert e of a stacked tensor [E, ...] is the contiguous range start + e*row .. + row, so an
expert is 9 ranges (gate/up/down × weight/scales/biases) in the original safetensors files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from flashmoe.errors import CheckpointError, OptionError
from flashmoe.checkpoints.safetensors_index import TensorInfo

PROJS = ("gate_proj", "up_proj", "down_proj")
FIELDS = ("weight", "scales", "biases")
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
    """A layer's stacked expert tensors and their quantization."""

    layer: int
    num_experts: int
    parts: tuple[PartSpec, ...]
    tensors: tuple[TensorInfo, ...]
    quant: tuple[tuple[str, int, int, str], ...]  # (proj, bits, group_size, mode)

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
    owns the read-only file descriptors (and O_DIRECT ones when io.direct is on)."""

    def __init__(self, layers: dict[int, LayerExperts], packed: dict | None = None,
                 direct: bool = False) -> None:
        self.layers, self.packed, self.direct = layers, packed, direct
        if packed:
            files = sorted({pl.file for pl in packed.values()})
        else:
            files = sorted({t.file for le in layers.values() for t in le.tensors})
        self.files: list[Path] = files
        self.names = [f.name for f in files]  # for read labels, without a Path call per read
        self.sizes = [f.stat().st_size for f in files]
        self._file_ids = {f: i for i, f in enumerate(files)}
        self.fds = [os.open(f, os.O_RDONLY) for f in files]
        self.direct_fds = [_open_direct(f) for f in files] if direct else []

    def close(self) -> None:
        for fd in self.fds + self.direct_fds:
            os.close(fd)
        self.fds, self.direct_fds = [], []

    def ranges(self, layer: int, expert: int) -> list[ByteRange]:
        """The expert's bytes, one range per part, in `parts` order."""
        le = self.layers[layer]
        if self.packed:
            pl = self.packed[layer]
            fid, pos = self._file_ids[pl.file], expert * pl.stride
            out = []
            for part in le.parts:
                out.append(ByteRange(fid, pos, part.nbytes))
                pos += part.nbytes
            return out
        return [ByteRange(self._file_ids[t.file], t.start + expert * part.nbytes, part.nbytes)
                for part, t in zip(le.parts, le.tensors)]

    def checksum(self, layer: int, expert: int) -> str | None:
        """The packed manifest's xxh64 of the expert's bytes (None without a packed layout)."""
        return self.packed[layer].checksums[expert] if self.packed else None

def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        raise OptionError("io_direct", "true", f"but {path} cannot be opened with O_DIRECT "
                          f"({e.strerror}); this filesystem does not support direct I/O, "
                          "turn direct reads off") from None


def layer_experts(tensors: dict[str, TensorInfo], prefix: str, layer: int,
                  quant: tuple[tuple[str, int, int, str], ...]) -> LayerExperts:
    """Collect `prefix`.{proj}.{field} stacked tensors of one layer, checking shapes agree."""
    parts, infos = [], []
    num_experts = None
    for proj in PROJS:
        for field in FIELDS:
            name = f"{prefix}.{proj}.{field}"
            t = tensors.get(name)
            if t is None:
                if field == "biases" and f"{prefix}.{proj}.scales" in tensors:
                    continue  # mxfp/nvfp modes carry no biases
                raise CheckpointError(
                    f"tensor {name} is missing from the checkpoint; flashmoe streams quantized "
                    "mlx-community experts (…switch_mlp.{gate,up,down}_proj.{weight,scales,biases})")
            if t.dtype not in STORAGE or len(t.shape) < 2:
                raise CheckpointError(f"{t.file}: tensor {name} has dtype {t.dtype} shape "
                                      f"{t.shape}; expected a stacked [experts, ...] tensor")
            num_experts = t.shape[0] if num_experts is None else num_experts
            if t.shape[0] != num_experts:
                raise CheckpointError(f"{t.file}: tensor {name} stacks {t.shape[0]} experts but "
                                      f"the layer's other expert tensors stack {num_experts}")
            parts.append(PartSpec(f"{proj}.{field}", t.shape[1:], STORAGE[t.dtype],
                                  t.nbytes // t.shape[0]))
            infos.append(t)
    return LayerExperts(layer, num_experts, tuple(parts), tuple(infos), quant)
