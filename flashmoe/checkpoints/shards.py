"""Byte-level shard I/O for tools that rewrite safetensors files (requant): tensor
placement in a new header, row reads and writes of stacked expert tensors, bounded copies."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from flashmoe.errors import CheckpointError
from flashmoe.runtime.fileio import pread_exact, pwrite_all

COPY_BYTES = 64 << 20  # bounded buffer: embeddings of big models are GB-sized
Advance = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ShardTensor:
    """One tensor of a safetensors file: absolute byte range [start, end) of `file`."""
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


# safetensors dtype → (numpy storage, mlx dtype); bf16 crosses numpy as uint16 bits
DTYPES: dict[str, tuple[Any, mx.Dtype]] = {
    "U32": (np.uint32, mx.uint32), "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16),
}


def layout(fname: str, tensors: dict[str, ShardTensor], new: dict[str, tuple[str, tuple]],
            meta: dict) -> tuple[bytes, dict[str, ShardTensor]]:
    """Header bytes and placement of one output shard (same tensor order as the source)."""
    entries: dict[str, Any] = {"__metadata__": meta} if meta else {}
    entries.update(dict.fromkeys(tensors))  # source key order: unchanged shards stay identical
    offset = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].start):
        dtype, shape = new.get(name, (t.dtype, t.shape))
        size = (t.end - t.start) if name not in new else \
            int(np.prod(shape)) * np.dtype(DTYPES[dtype][0]).itemsize
        entries[name] = {"data_offsets": [offset, offset + size], "dtype": dtype,
                         "shape": list(shape)}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
    base = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, {
        k: ShardTensor(fname, e["dtype"], tuple(e["shape"]), base + e["data_offsets"][0],
                  base + e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__"}


def read_rows(fd: int, t: ShardTensor, e0: int, e1: int) -> mx.array:
    if t.dtype not in DTYPES:
        raise CheckpointError(f"expert tensor dtype {t.dtype} in {t.file} is not one of "
                              f"{sorted(DTYPES)}; requant cannot read it")
    row = (t.end - t.start) // t.shape[0]
    buf = np.empty((e1 - e0) * row, np.uint8)
    pread_exact(fd, memoryview(buf), t.start + e0 * row, t.file)
    storage, dtype = DTYPES[t.dtype]
    a = mx.array(buf.view(storage)).reshape(e1 - e0, *t.shape[1:])
    return a if a.dtype == dtype else a.view(dtype)


def write_rows(fds: dict[str, int], t: ShardTensor, e0: int, arr: mx.array) -> None:
    assert arr.dtype == DTYPES[t.dtype][1] and tuple(arr.shape[1:]) == t.shape[1:]
    data = np.array(arr.view(mx.uint16) if arr.dtype == mx.bfloat16 else arr)
    row = (t.end - t.start) // t.shape[0]
    pwrite_all(fds[t.file], memoryview(data).cast("B"), t.start + e0 * row)


def copy(fd_in: int, src_off: int, fd_out: int, dst_off: int, size: int,
          advance: Advance) -> None:
    buf = memoryview(bytearray(min(size, COPY_BYTES)))
    for done in range(0, size, COPY_BYTES):
        n = min(COPY_BYTES, size - done)
        pread_exact(fd_in, buf[:n], src_off + done, f"fd {fd_in}")
        pwrite_all(fd_out, buf[:n], dst_off + done)
        advance(n)
