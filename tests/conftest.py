"""Shared fixtures: tiny checkpoints built once per session with mlx-lm itself."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.tiny import build_tiny
from tests.parity import Trace, mlx_lm_trace

REF_STEPS = 32  # the reference decodes this many tokens once; tests take a prefix


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, bits=4, **overrides) -> checkpoint dir, built once per distinct request."""
    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def make(family: str = "qwen3_5_moe", bits: int = 4, dtype=None, **overrides) -> Path:
        key = (family, bits, str(dtype), tuple(sorted(overrides.items())))
        if key not in built:
            path = root / f"{family}-b{bits}-{len(built)}"
            extra = {"dtype": dtype} if dtype is not None else {}
            built[key] = build_tiny(path, family, bits=bits, overrides=overrides or None, **extra)
        return built[key]

    return make


@pytest.fixture(scope="session")
def wide(tiny):
    """wide(family): expert weight parts of 128 KiB, twice io_pool.MIN_CHUNK, so io.split
    really cuts each read in two (the tiny fixtures' parts are at most 24 KiB: never cut)."""
    def make(family: str = "qwen3_moe", **overrides) -> Path:
        key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
        return tiny(family, **{"hidden_size": 256, key: 1024, **overrides})

    return make


@pytest.fixture(scope="session")
def reference():
    """reference(path, prompt, n=32, upcast=False) -> mlx-lm's Trace, computed once a session."""
    done: dict[tuple, Trace] = {}

    def get(path: Path, prompt: list[int], n: int = REF_STEPS, upcast: bool = False) -> Trace:
        assert n <= REF_STEPS
        key = (str(path), tuple(prompt), upcast)
        if key not in done:
            done[key] = mlx_lm_trace(path, prompt, REF_STEPS, upcast)
        return done[key].head(n)

    return get


def with_k(src: Path, dst: Path, k: int) -> Path:
    """A view of a checkpoint whose config asks mlx-lm for k experts per token: its own
    config.json, every other file a symlink (a 47 GB checkpoint is not copied)."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    shutil.copyfile(Path(src) / "config.json", dst / "config.json")
    cfg = json.loads((dst / "config.json").read_text())
    (cfg.get("text_config", cfg))["num_experts_per_tok"] = k
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


START_LINE = "flashmoe: MLX "  # app.start_line: backend and device, first line of a started run


def error_lines(stderr: str) -> list[str]:
    """stderr lines after the start line that every run printing past validation begins with."""
    lines = stderr.strip().splitlines()
    return lines[1:] if lines and lines[0].startswith(START_LINE) else lines


BLOB_BYTES = 4 * 64 * 4096


@pytest.fixture
def blob(tmp_path):
    """(read-only fd, its bytes): a file of BLOB_BYTES random bytes, for the read-path tests."""
    data = np.random.default_rng(0).integers(0, 256, BLOB_BYTES, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
    yield fd, data
    os.close(fd)
