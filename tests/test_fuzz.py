"""Fuzzing the header and manifest readers: any input gives a result that holds, or a clean error.

Each property runs twice: a short seeded version in every test run (CI), and a long one under
the `fuzz` marker (`make fuzz`, ≥ 100,000 inputs in all, excluded by pyproject's addopts).
With atheris installed, `make fuzz` also runs it, coverage-guided, on the same readers.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flashmoe.errors import CheckpointError
from flashmoe.runtime.safetensors_index import (DTYPE_BYTES, parse_config, parse_header,
                                                parse_weight_map, read_header)

REPO = Path(__file__).resolve().parents[1]
WHERE = Path("ckpt/model.safetensors")
CI_EXAMPLES = 150


# ---- what must hold -----------------------------------------------------------------------
def clean_error(e: CheckpointError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and len(msg) < 1000, msg


def check_header(raw: bytes, size: int) -> None:
    """parse_header returns only tensors inside the file, sized right, not overlapping."""
    try:
        tensors = parse_header(raw, WHERE, size)
    except CheckpointError as e:
        return clean_error(e)
    header = json.loads(raw)  # parsed: so it is JSON; each tensor must say what it says
    assert set(tensors) == set(header) - {"__metadata__"}
    spans = []
    for t in tensors.values():
        meta = header[t.name]
        assert (t.dtype, list(t.shape)) == (meta["dtype"], meta["shape"])
        assert [t.start - 8 - len(raw), t.end - 8 - len(raw)] == meta["data_offsets"]
        assert 8 + len(raw) <= t.start <= t.end <= size
        assert t.nbytes == math.prod(t.shape) * DTYPE_BYTES[t.dtype]
        if t.nbytes:
            spans.append((t.start, t.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def check_file(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        try:
            tensors = read_header(Path(f.name))
        except CheckpointError as e:
            return clean_error(e)
    assert all(t.end <= len(data) for t in tensors.values())


def check_valid_file(case: tuple[bytes, dict]) -> None:
    """A well-formed file must parse, to exactly its header, as the safetensors library reads it."""
    from safetensors import safe_open

    data, header = case
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        tensors = read_header(Path(f.name))  # must not raise
        with safe_open(f.name, framework="numpy") as ref:
            theirs = {k: (ref.get_slice(k).get_dtype(), ref.get_slice(k).get_shape())
                      for k in ref.keys()}
    start = 8 + int.from_bytes(data[:8], "little")
    want = {k: (m["dtype"], tuple(m["shape"]), start + m["data_offsets"][0],
                start + m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"}
    assert {k: (t.dtype, t.shape, t.start, t.end) for k, t in tensors.items()} == want
    assert {k: (d, tuple(sh)) for k, (d, sh) in theirs.items()} == \
        {k: (d, sh) for k, (d, sh, _, _) in want.items()}


def check_corrupted(case: tuple[bytes, str]) -> None:
    """A well-formed file with exactly one corruption must be refused, in one clean line."""
    data, what = case
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with pytest.raises(CheckpointError) as e:
            read_header(Path(f.name))
    clean_error(e.value)


def check_config(raw: bytes) -> None:
    try:
        config = parse_config(raw, Path("config.json"))
    except CheckpointError as e:
        return clean_error(e)
    assert isinstance(config.get("model_type"), str)
    assert isinstance(config.get("text_config", config), dict)


def check_weight_map(raw: bytes) -> None:
    try:
        weight_map = parse_weight_map(raw, Path("model.safetensors.index.json"))
    except CheckpointError as e:
        return clean_error(e)
    for file in weight_map.values():
        assert isinstance(file, str) and not file.startswith("/") and ".." not in Path(file).parts


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
        raw = json.dumps(header)
        entry = json.dumps({name: meta})[1:-1]
        raw = "{" + entry + ", " + raw[1:]
        data = len(raw.encode()).to_bytes(8, "little") + raw.encode() + data[8 + len(json.dumps(header).encode()):]
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


# ---- the tests: seeded and short by default, long under `-m fuzz` -----------------------------
def make_test(prop: Callable[[Any], None], strategy: Any, examples: int, fuzz: bool) -> Callable:
    @settings(max_examples=examples, derandomize=not fuzz, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def test(case: Any) -> None:
        prop(case)

    return pytest.mark.fuzz(test) if fuzz else test


def header_case(case: tuple[bytes, int]) -> None:
    check_header(*case)


TARGETS: dict[str, tuple[Callable[[Any], None], Any, int]] = {
    "header_bytes": (lambda raw: check_header(raw, 8 + len(raw) + 64), st.binary(max_size=300),
                     25_000),
    "header_structured": (header_case, headers(), 25_000),
    "header_mutated": (header_case, mutated(), 20_000),
    "header_file": (check_file, files(), 10_000),
    "header_valid": (check_valid_file, valid_files(), 10_000),
    "header_corrupted": (check_corrupted, corrupted_files(), 10_000),
    "config": (check_config, configs(), 10_000),
    "weight_map": (check_weight_map, weight_maps(), 10_000),
}
for _name, (_prop, _strategy, _n) in TARGETS.items():
    globals()[f"test_{_name}_seeded"] = make_test(_prop, _strategy, CI_EXAMPLES, fuzz=False)
    globals()[f"test_fuzz_{_name}"] = make_test(_prop, _strategy, _n, fuzz=True)


def test_structured_inputs_reach_the_success_paths():
    """The seeded generators reach the parsers' success paths with several tensors, not only
    their error paths: of 150 structured headers, a fair share parse with >= 2 tensors."""
    parsed: list[int] = []

    @settings(max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(headers())
    def run(case: tuple[bytes, int]) -> None:
        try:
            parsed.append(len(parse_header(case[0], WHERE, case[1])))
        except CheckpointError:
            parsed.append(-1)

    run()
    assert sum(n >= 2 for n in parsed) >= CI_EXAMPLES // 5, sorted(parsed)


# ---- atheris (coverage-guided), when it is installed -------------------------------------------
def atheris_main(runs: int, workdir: str) -> None:
    """libFuzzer over the same readers; the first input byte picks the reader."""
    import atheris

    from flashmoe.runtime import safetensors_index as si

    for fn in (si.parse_header, si._tensor_info, si._check_layout, si.json_object,
               si.parse_config, si.parse_weight_map):
        atheris.instrument_func(fn)
    readers = [lambda b: check_header(b, 8 + len(b) + 64), check_config, check_weight_map]

    def one(data: bytes) -> None:
        if data:
            readers[data[0] % len(readers)](data[1:])

    corpus = Path(workdir) / "corpus"
    corpus.mkdir(exist_ok=True)
    seed = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    for i, obj in enumerate([seed, {"model_type": "qwen3_moe"}, {"weight_map": {"w": "m.st"}}]):
        (corpus / f"seed{i}").write_bytes(bytes([i]) + json.dumps(obj).encode())
    atheris.Setup(["fuzz", f"-runs={runs}", f"-artifact_prefix={workdir}/", str(corpus)], one)
    atheris.Fuzz()


@pytest.mark.fuzz
def test_fuzz_atheris(tmp_path):
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, "-c", "import tests.test_fuzz as t; "
                          f"t.atheris_main(100_000, {str(tmp_path)!r})"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
