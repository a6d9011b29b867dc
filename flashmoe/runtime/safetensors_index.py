"""Parse safetensors headers (no data read) and index a checkpoint directory's tensors."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from flashmoe.errors import CheckpointError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's place in one file: absolute byte range [start, end)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Read and check one safetensors header; raise CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a "
                                      "safetensors header (needs at least 8)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CheckpointError(f"{path}: header length {hlen} does not fit in the "
                                      f"{size}-byte file; the file is truncated or not safetensors")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_header(raw, path, size)


def parse_header(raw: bytes, path: Path, size: int) -> dict[str, TensorInfo]:
    """Validate the JSON header bytes of `path` (total file `size`) into TensorInfos."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({type(e).__name__}); "
                              "the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(name, meta, path, data_start)
    _check_layout(tensors, path, size - data_start, data_start)
    return tensors


def _tensor_info(name: str, meta: object, path: Path, data_start: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: entry for tensor {name!r} is not an object")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; "
                              f"expected one of {sorted(DTYPE_BYTES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; "
                              "expected a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2
            and all(type(o) is int and o >= 0 for o in offs) and offs[0] <= offs[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offs!r}; "
                              "expected [begin, end] with 0 <= begin <= end")
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if offs[1] - offs[0] != want:
        raise CheckpointError(f"{path}: tensor {name!r} spans {offs[1] - offs[0]} bytes but "
                              f"{dtype}{shape} needs {want}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def _check_layout(tensors: dict[str, TensorInfo], path: Path, data_len: int,
                  data_start: int) -> None:
    """Offsets in bounds and non-overlapping; the file holds every byte the header names."""
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    prev_end, prev_name = data_start, None
    for start, end, name in spans:
        if start < prev_end and end > start:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps {prev_name!r}; "
                                  "the header is corrupt")
        prev_end, prev_name = max(prev_end, end), name
    if spans and spans[-1][1] - data_start > data_len:
        last = max(spans, key=lambda s: s[1])
        raise CheckpointError(
            f"{path}: file is truncated: tensor {last[2]!r} ends at byte {last[1]} but the file "
            f"has {data_start + data_len} bytes; re-download this file")


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    """Every tensor of a checkpoint directory, by name, from headers only."""

    root: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, root: Path | str) -> "CheckpointIndex":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"model.path={root} is not a directory; point it at an "
                                  "mlx-community checkpoint (config.json + *.safetensors)")
        config = _read_config(root)
        tensors: dict[str, TensorInfo] = {}
        for file in _weight_files(root):
            tensors.update(read_header(file))
        return cls(root, config, tensors)


def _read_config(root: Path) -> dict:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{root}: config.json is missing; a checkpoint directory needs "
                              "config.json, model*.safetensors and tokenizer files")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{cfg}: has no 'model_type'; is this a Hugging Face/mlx config?")
    return config


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable or has no weight_map ({e})") from None
        files = sorted({root / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{root}: the index names {missing[:3]} but they are missing; "
                                  "the download is incomplete")
        return files
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no model*.safetensors files found")
    return files


def file_size(path: Path) -> int:
    return os.stat(path).st_size
