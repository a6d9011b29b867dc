"""What identifies a source safetensors file's bytes, so a packed layout is never read stale.

Size and the header's hash catch a different download; a re-upload with the same shapes (a
fixed revision) has the same size and header, so a few experts' bytes are hashed too. When
only the mtime differs (a copy), the sample decides: same bytes, same pack.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from flashmoe.errors import CheckpointError
from flashmoe.runtime.expert_store import LayerExperts
from flashmoe.runtime.fileio import pread_exact

SAMPLES = 8  # expert byte ranges hashed per file


def fingerprints(layers: dict[int, LayerExperts]) -> dict[str, dict]:
    """{file name: {size, mtime_ns, header_xxh64, sample_xxh64}} for every source file."""
    files = sorted({t.file for le in layers.values() for t in le.tensors})
    return {f.name: fingerprint(f, layers) for f in files}


def fingerprint(file: Path, layers: dict[int, LayerExperts]) -> dict:
    st = os.stat(file)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_xxh64": header_hash(file),
            "sample_xxh64": sample_hash(file, layers)}


def header_hash(file: Path) -> str:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return xxhash.xxh64(f.read(n)).hexdigest()


def sample_hash(file: Path, layers: dict[int, LayerExperts]) -> str:
    """xxh64 over up to SAMPLES expert parts stored in `file` (first, middle, last experts)."""
    ranges = []
    for le in layers.values():
        for i, part in enumerate(le.parts):
            for e in sorted({0, le.num_experts // 2, le.num_experts - 1}):
                where, offset = le.locate(i, e)
                if where == file:
                    ranges.append((offset, part.nbytes))
    step = max(1, len(ranges) // SAMPLES)
    h = xxhash.xxh64()
    fd = os.open(file, os.O_RDONLY)
    try:
        for offset, nbytes in ranges[::step][:SAMPLES]:
            buf = np.empty(nbytes, dtype=np.uint8)
            pread_exact(fd, memoryview(buf), offset, str(file))
            h.update(memoryview(buf))
    finally:
        os.close(fd)
    return h.hexdigest()


def check_fingerprints(recorded: object, layers: dict[int, LayerExperts], manifest: Path) -> None:
    """Raise a CheckpointError naming the first source file whose bytes changed since packing."""
    fix = f"delete {manifest.parent} and re-run task=pack"
    files = {t.file.name: t.file for le in layers.values() for t in le.tensors}
    if not isinstance(recorded, dict) or set(recorded) != set(files) or not all(
            isinstance(r, dict) for r in recorded.values()):
        raise CheckpointError(f"{manifest}: the checkpoint's safetensors changed since it was "
                              f"packed (other files, or a pack without fingerprints); {fix}")
    for name, rec in sorted(recorded.items()):
        file = files[name]
        st = os.stat(file)
        if rec.get("size") != st.st_size or rec.get("header_xxh64") != header_hash(file):
            what = "size" if rec.get("size") != st.st_size else "header"
            raise CheckpointError(f"{file} changed since it was packed (its {what} differs from "
                                  f"{manifest}); {fix}")
        if rec.get("mtime_ns") != st.st_mtime_ns and \
                rec.get("sample_xxh64") != sample_hash(file, layers):
            raise CheckpointError(f"{file} changed since it was packed (same size and header, "
                                  f"but its expert bytes differ from {manifest}); {fix}")
