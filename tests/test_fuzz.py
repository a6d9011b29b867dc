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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe.errors import CheckpointError
from flashmoe.checkpoints.safetensors_index import (DTYPE_BYTES, parse_config, parse_header,
                                                parse_weight_map, read_header)
from tests.fuzz_inputs import (configs, corrupted_files, files, headers, mutated, valid_files,
                               weight_maps)

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

    from flashmoe.checkpoints import safetensors_index as si

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
