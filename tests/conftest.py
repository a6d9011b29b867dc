"""Shared fixtures: tiny checkpoints built once per session with mlx-lm itself."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures.tiny import build_tiny


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


def with_k(src: Path, dst: Path, k: int) -> Path:
    """A copy of a checkpoint whose config asks mlx-lm for k experts per token."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (cfg.get("text_config", cfg))["num_experts_per_tok"] = k
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
