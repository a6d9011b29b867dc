"""Hypothesis strategies for tests/test_fuzz.py: junk, nearly valid and well-formed
safetensors headers and files, configs and weight maps."""
from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from flashmoe.checkpoints.safetensors_index import DTYPE_BYTES

# ---- inputs -------------------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                 st.text(max_size=6), st.lists(st.integers(-2, 2**65), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=8)),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def headers(draw: Any, junk: bool = True) -> tuple[bytes, int]:
    """A safetensors header and a file size: valid or nearly (holes, overlaps, a bad field)."""
    entries: dict[str, Any] = {}
    end = 0
    for _ in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        start = max(0, end + draw(st.sampled_from([0] * 9 + [1, -1, -size])))
        meta: dict[str, Any] = {"dtype": dtype, "shape": shape,
                                "data_offsets": [start, start + size]}
        if junk and draw(st.integers(0, 15)) == 0:
            meta[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(JUNK)
        entries[draw(st.text(max_size=10))] = meta
        end = max(end, start + size)
    if draw(st.booleans()):  # mostly well-formed, sometimes junk
        bad = junk and draw(st.integers(0, 3)) == 0
        entries["__metadata__"] = draw(JUNK) if bad else {"format": "mlx"}
    raw = json.dumps(entries).encode()
    return raw, 8 + len(raw) + end + draw(st.sampled_from([0] * 6 + [7, -1, -end]))


@st.composite
def mutated(draw: Any) -> tuple[bytes, int]:
    """A valid header with a few bytes flipped, cut, repeated or inserted."""
    raw, size = draw(headers(junk=False))
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["flip", "cut", "repeat", "insert"]))
        if op == "flip" and i < len(buf):
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[i:i + draw(st.integers(1, 8))]
        elif op == "repeat":
            buf[i:i] = buf[i:i + draw(st.integers(1, 16))]
        else:
            buf[i:i] = draw(st.sampled_from([b"{", b"}", b'"', b",", b"[", b"\xff", b"1e999",
                                              b'"data_offsets":[0,1]', b"9" * 30,
                                              b"9" * 5000]))
    return bytes(buf), size


@st.composite
def files(draw: Any) -> bytes:
    """Whole files: length prefix right or wrong, header, some data bytes."""
    raw, size = draw(headers())
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1), st.integers(0, 64)))
    data = max(0, size - 8 - len(raw))
    body = length.to_bytes(8, "little") + raw + b"\0" * data
    return body[:draw(st.sampled_from([len(body), len(body), 0, 7, 8, len(body) // 2]))]


@st.composite
def valid_headers(draw: Any) -> dict:
    """2-6 uniquely named tensors laid end to end in an order unrelated to the key order."""
    n = draw(st.integers(2, 6))
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda t: t != "__metadata__"),
                          min_size=n, max_size=n, unique=True))
    specs = {name: (draw(st.sampled_from(sorted(DTYPE_BYTES))),
                    draw(st.lists(st.integers(0, 5), max_size=3))) for name in names}
    pos, header = 0, {}
    for name in draw(st.permutations(names)):
        dtype, shape = specs[name]
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    header = {name: header[name] for name in names}
    if draw(st.booleans()):
        header["__metadata__"] = {"format": draw(st.sampled_from(["pt", "mlx", "np"]))}
    return header


def encode_file(header: dict, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad  # the spec allows trailing spaces
    end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
    return len(raw).to_bytes(8, "little") + raw + bytes(range(256)) * (end // 256) + \
        bytes(end % 256)


@st.composite
def valid_files(draw: Any) -> tuple[bytes, dict]:
    header = draw(valid_headers())
    return encode_file(header, draw(st.integers(0, 7))), header


CORRUPTIONS = ("size", "overlap", "truncate", "dtype", "shape", "reversed", "duplicate")


@st.composite
def corrupted_files(draw: Any) -> tuple[bytes, str]:
    """A valid file with one corruption that the reader must notice."""
    header = draw(valid_headers())
    what = draw(st.sampled_from(CORRUPTIONS))
    tensors = [k for k in header if k != "__metadata__"]
    full = [k for k in tensors if header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
    name = draw(st.sampled_from(tensors))
    meta = header[name]
    if what == "size":  # the span disagrees with dtype x shape
        meta["data_offsets"][1] += draw(st.sampled_from([1, -1])) if meta["data_offsets"][1] > \
            meta["data_offsets"][0] else 1
    elif what == "overlap":  # one non-empty tensor moved onto another's first byte
        assume(len(full) >= 2)
        a, b = draw(st.permutations(full))[:2]
        size = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
        start = header[b]["data_offsets"][0]
        header[a]["data_offsets"] = [start, start + size]
    elif what == "dtype":
        meta["dtype"] = draw(st.sampled_from(["F12", "f32", "", "Q4"]))
    elif what == "shape":
        meta["shape"] = meta["shape"] + [draw(st.sampled_from([-1, 1.5, "2", None]))]
    elif what == "reversed":
        meta["data_offsets"] = [meta["data_offsets"][1] + 1, meta["data_offsets"][0]]
    data = encode_file(header)
    if what == "truncate":
        assume(full)
        data = data[:-draw(st.integers(1, 8))]
    elif what == "duplicate":  # the same key twice in the JSON text
        body = data[8 + len(json.dumps(header).encode()):]
        raw = ("{" + json.dumps({name: meta})[1:-1] + ", " + json.dumps(header)[1:]).encode()
        data = len(raw).to_bytes(8, "little") + raw + body
    return data, what


def configs() -> st.SearchStrategy[bytes]:
    obj = st.fixed_dictionaries({}, optional={"model_type": st.one_of(st.text(max_size=8), JUNK),
                                              "text_config": st.one_of(JSON, JUNK),
                                              "num_experts": JUNK})
    encode = lambda o: json.dumps(o).encode()  # noqa: E731
    return st.one_of(obj.map(encode), JSON.map(encode), st.binary(max_size=64))


def weight_maps() -> st.SearchStrategy[bytes]:
    odd = ["model.safetensors", "a/b.safetensors", "../x", "/etc/x", "", ".", "a\0b", "./m.st"]
    names = st.one_of(st.sampled_from(odd), st.text(max_size=8), JUNK)
    obj = st.fixed_dictionaries({}, optional={"weight_map": st.one_of(
        st.dictionaries(st.text(max_size=6), names, max_size=4), JUNK), "metadata": JSON})
    return st.one_of(obj.map(lambda o: json.dumps(o).encode()), st.binary(max_size=64))
