"""The packed expert layout: one file per layer, each expert one page-aligned contiguous blob.

    <checkpoint>/flashmoe-packed/manifest.json   offsets, sizes, xxh64 per expert
    <checkpoint>/flashmoe-packed/layer_007.bin   expert e at e * stride: its parts back to back

The original safetensors stay the source of truth; the manifest records what identifies their
bytes (fingerprint.py), so a re-downloaded or rewritten checkpoint is noticed and the pack
refused as stale.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from flashmoe.checkpoints.fingerprint import check_fingerprints, fingerprints
from flashmoe.errors import CheckpointError
from flashmoe.runtime.expert_store import LayerExperts
from flashmoe.runtime.fileio import pread_exact
from flashmoe.runtime.staging import staged

FORMAT = "flashmoe-packed/1"
DIRNAME = "flashmoe-packed"


@dataclass(frozen=True, slots=True)
class PackedLayer:
    file: Path
    stride: int
    num_experts: int
    part_bytes: tuple[int, ...]
    checksums: tuple[str, ...]


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def expert_hash(views: list[np.ndarray]) -> str:
    h = xxhash.xxh64()
    for v in views:
        h.update(memoryview(v))
    return h.hexdigest()


def write_packed(layers: dict[int, LayerExperts], out: Path, align: int = 4096,
                 progress: Callable[[int], Any] | None = None, log: Any = None) -> Path:
    """Copy every expert into per-layer blobs (atomic: staged in a temp folder, then renamed;
    free space checked first, orphans of killed packs removed: runtime/staging.py)."""
    def refuse_existing() -> None:
        if out.exists():
            raise CheckpointError(f"{out} already exists; remove it or choose task.out=ANOTHER_DIR")

    needed = sum(align_up(le.expert_nbytes, align) * le.num_experts for le in layers.values())
    with staged(out, needed=needed, hint="choose another folder with task.out=DIR", log=log,
                check=refuse_existing) as tmp:
        entries = {str(i): _pack_layer(le, tmp, align, progress) for i, le in layers.items()}
        manifest = {"format": FORMAT, "align": align, "source": fingerprints(layers),
                    "layers": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def _pack_layer(le: LayerExperts, root: Path, align: int, progress: Callable | None) -> dict:
    size = le.expert_nbytes
    stride = align_up(size, align)
    name = f"layer_{le.layer:03d}.bin"
    blob = np.zeros(stride, dtype=np.uint8)
    sums = []
    fds = {t.file: os.open(t.file, os.O_RDONLY) for t in le.tensors}
    try:
        with open(root / name, "wb") as out:
            for e in range(le.num_experts):
                pos = 0
                for i, part in enumerate(le.parts):
                    file, offset = le.locate(i, e)
                    pread_exact(fds[file], memoryview(blob[pos:pos + part.nbytes]), offset,
                                str(file))
                    pos += part.nbytes
                sums.append(xxhash.xxh64(memoryview(blob[:size])).hexdigest())
                out.write(memoryview(blob))
                if progress:
                    progress(stride)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"file": name, "stride": stride, "num_experts": le.num_experts,
            "parts": [{"key": p.key, "nbytes": p.nbytes} for p in le.parts], "xxh64": sums}


def read_manifest(root: Path, layers: dict[int, LayerExperts]) -> dict[int, PackedLayer]:
    """Load and check a packed layout against the checkpoint it claims to pack."""
    path = root / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable packed manifest ({type(e).__name__}); "
                              "delete the folder and re-run task=pack") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {m.get('format') if isinstance(m, dict) else m!r} "
                              f"is not {FORMAT}; re-run task=pack")
    check_fingerprints(m.get("source"), layers, path)
    entries = m.get("layers")
    if not isinstance(entries, dict) or set(entries) != {str(i) for i in layers}:
        raise CheckpointError(f"{path}: packs layers {sorted(entries) if isinstance(entries, dict) else '?'}"
                              f" but the model streams layers {sorted(layers)}; re-run task=pack")
    return {i: _layer_entry(root, path, entries[str(i)], le) for i, le in layers.items()}


def _layer_entry(root: Path, path: Path, ent: Any, le: LayerExperts) -> PackedLayer:
    try:
        parts = tuple(int(p["nbytes"]) for p in ent["parts"])
        keys = tuple(str(p["key"]) for p in ent["parts"])
        pl = PackedLayer(root / str(ent["file"]), int(ent["stride"]), int(ent["num_experts"]),
                         parts, tuple(str(c) for c in ent["xxh64"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: layer {le.layer} entry is malformed ({e!r}); "
                              "re-run task=pack") from None
    want = tuple(p.nbytes for p in le.parts)
    if keys != tuple(p.key for p in le.parts) or parts != want or pl.num_experts != le.num_experts \
            or len(pl.checksums) != le.num_experts or pl.stride < sum(want):
        raise CheckpointError(f"{path}: layer {le.layer} does not match the checkpoint's experts "
                              f"({le.num_experts} experts of parts {want}); re-run task=pack")
    if "/" in str(ent["file"]) or not pl.file.is_file() \
            or pl.file.stat().st_size < pl.stride * pl.num_experts:
        raise CheckpointError(f"{pl.file}: missing or shorter than {pl.stride * pl.num_experts} "
                              "bytes; the packed layout is incomplete, re-run task=pack")
    return pl
