"""Parse safetensors headers (no data read) and index a checkpoint directory's tensors.

Everything here reads headers and manifests only. Any malformed input ends in a CheckpointError
naming the file, the tensor and what was expected; tests/test_fuzz.py holds the parsers to that.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flashmoe.errors import CheckpointError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit
MAX_U64 = 2**64 - 1  # sizes and offsets are u64 on disk; anything larger is corruption


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


def short(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Read and check one safetensors header; raise CheckpointError naming what is wrong."""
    return read_file_header(path)[0]


def read_file_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """read_header, plus the file's `__metadata__` object (empty when absent)."""
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
    if len(raw) < hlen:  # the file shrank while we read it
        raise CheckpointError(f"{path}: header is {hlen} bytes but only {len(raw)} could be read; "
                              "the file is being truncated or rewritten")
    return _parse(raw, path, size)


def parse_header(raw: bytes, path: Path, size: int) -> dict[str, TensorInfo]:
    """Validate the JSON header bytes of `path` (total file `size`) into TensorInfos."""
    return _parse(raw, path, size)[0]


def _parse(raw: bytes, path: Path, size: int) -> tuple[dict[str, TensorInfo], dict]:
    data_start = 8 + len(raw)
    header = json_object(raw, path, "header")
    tensors, metadata = {}, {}
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise CheckpointError(f"{path}: __metadata__ is {type(meta).__name__}; "
                                      "expected an object of strings")
            metadata = meta
            continue
        tensors[name] = _tensor_info(name, meta, path, data_start)
    _check_layout(tensors, path, size, data_start)
    return tensors, metadata


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def json_object(raw: bytes, where: Path, what: str) -> dict:
    """Decode `raw` as one JSON object with unique keys, or raise a CheckpointError."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: {what} names {short(e.args[0])} twice; "
                              "the file is corrupt") from None
    # ValueError covers bad UTF-8, bad JSON and integers too long to convert
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: {what} is not valid JSON ({type(e).__name__}); "
                              "the file is corrupt or not what its name says") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _u64_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= MAX_U64 for v in value)


def _tensor_info(name: str, meta: object, path: Path, data_start: int) -> TensorInfo:
    what = f"{path}: tensor {short(name)}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what}: entry is {type(meta).__name__}, not an object")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{what} has dtype {short(dtype)}; "
                              f"expected one of {', '.join(sorted(DTYPE_BYTES))}")
    if not _u64_list(shape):
        raise CheckpointError(f"{what} has shape {short(shape)}; "
                              "expected a list of non-negative integers")
    if not (_u64_list(offs) and len(offs) == 2 and offs[0] <= offs[1]):
        raise CheckpointError(f"{what} has data_offsets {short(offs)}; "
                              "expected [begin, end] with 0 <= begin <= end")
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if want > MAX_U64:
        raise CheckpointError(f"{what} has shape {short(shape)}: more than 2**64 bytes")
    if offs[1] - offs[0] != want:
        raise CheckpointError(f"{what} spans {offs[1] - offs[0]} bytes but "
                              f"{dtype}{short(shape)} needs {want}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def _check_layout(tensors: dict[str, TensorInfo], path: Path, size: int, data_start: int) -> None:
    """Offsets in bounds and non-overlapping; the file holds every byte the header names."""
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    prev_end, prev_name = data_start, None
    for start, end, name in spans:  # empty tensors occupy no bytes and overlap nothing
        if start < prev_end:
            raise CheckpointError(f"{path}: tensor {short(name)} overlaps {short(prev_name)}; "
                                  "the header is corrupt")
        prev_end, prev_name = end, name
    last = max(tensors.values(), key=lambda t: t.end, default=None)
    if last is not None and last.end > size:
        raise CheckpointError(
            f"{path}: file is truncated: tensor {short(last.name)} ends at byte {last.end} but "
            f"the file has {size} bytes; re-download this file")


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
            raise CheckpointError(f"{root} is not a directory; point it at an "
                                  "mlx-community checkpoint (config.json + *.safetensors)")
        config = parse_config(_read(root / "config.json", "a checkpoint directory needs "
                                    "config.json, model*.safetensors and tokenizer files"),
                              root / "config.json")
        files, weight_map = _weight_files(root)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{file}: tensor {short(name)} is also in "
                                          f"{tensors[name].file.name}; a checkpoint holds each "
                                          "tensor once")
                tensors[name] = info
        _check_weight_map(root, weight_map, tensors)
        return cls(root, config, tensors)


def _read(path: Path, hint: str) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} is missing; {hint}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def parse_config(raw: bytes, where: Path) -> dict:
    """config.json's bytes → its object; it must name a model_type (nested configs too)."""
    config = json_object(raw, where, "config")
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config is {type(text).__name__}; expected an object")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{where}: has no 'model_type' string (got "
                              f"{short(config.get('model_type'))}); is this a Hugging Face/mlx "
                              "config?")
    return config


def parse_weight_map(raw: bytes, where: Path) -> dict[str, str]:
    """model.safetensors.index.json's bytes → {tensor: file name inside the checkpoint}."""
    weight_map = json_object(raw, where, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: 'weight_map' is {short(weight_map)}; expected a "
                              "non-empty object of tensor name -> file name")
    for name, file in weight_map.items():
        parts = PurePosixPath(file).parts if isinstance(file, str) else ()
        if not parts or parts[0] == "/" or ".." in parts or "\0" in file:
            raise CheckpointError(f"{where}: weight_map maps {short(name)} to {short(file)}; "
                                  "expected a file name inside the checkpoint directory")
    return weight_map


def _weight_files(root: Path) -> tuple[list[Path], dict[str, str]]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = parse_weight_map(_read(index, ""), index)
        files = sorted({root / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{root}: the index names {missing[:3]} but they are missing; "
                                  "the download is incomplete")
        return files, weight_map
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no model*.safetensors files found")
    return files, {}


def _check_weight_map(root: Path, weight_map: dict[str, str],
                      tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index promises is in some file's header."""
    for name, file in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{root / file}: model.safetensors.index.json places tensor {short(name)} in this "
                "file but its header does not have it (nor does any other file); the file is "
                "incomplete or from another download")

