"""Every speed lever keeps flashmoe exactly equal to mlx-lm; the packed layout is checked."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flashmoe.errors import CheckpointError, ConfigError, ExpertReadError
from flashmoe.models.loader import load_resident
from flashmoe.checkpoints.packed import DIRNAME, write_packed
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from tests.reference import flashmoe_greedy, mlx_lm_greedy

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from tests.fixtures.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("levers") / "ckpt", "qwen3_5_moe")
    ref = mlx_lm_greedy(path, PROMPT, 12)
    res = load_resident(path, CheckpointIndex.open(path), evaluate=False)
    write_packed(res.experts, path / DIRNAME)
    return path, ref


LEVERS = [
    {"layout": "original", "cache_policy": "none"},
    {"layout": "original", "cache_policy": "lru", "cache_budget_gb": 1.0},
    {"layout": "original", "cache_policy": "lfu", "cache_budget_gb": 4.5e-5},
    {"layout": "packed", "io_split": 3},
    {"layout": "packed", "io_verify": True, "io_split": 8, "io_threads": 5},
    {"layout": "packed", "io_direct": True, "cache_policy": "none"},
    {"layout": "original", "io_direct": True, "io_split": 2},
    {"layout": "original", "prefetch": True, "cache_policy": "none"},
    {"layout": "packed", "prefetch": True, "cache_policy": "lru", "cache_budget_gb": 1.0},
    {"layout": "original", "cache_policy": "lru", "cache_budget_gb": 4.5e-5,
     "cache_host_budget_gb": 1.0},
    {"layout": "packed", "cache_policy": "lfu", "cache_budget_gb": 4.5e-5,
     "cache_host_budget_gb": 1.0, "io_split": 3},
]


@pytest.mark.parametrize("opts", LEVERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
async def test_every_lever_matches_mlx_lm(packed, opts):
    path, (ref_toks, ref_last) = packed
    toks, last, _ = await flashmoe_greedy(path, PROMPT, 12, **opts)
    assert toks == ref_toks
    assert np.abs(last - ref_last).max() / np.abs(ref_last).max() < 1e-3


async def test_verify_names_the_corrupt_expert(packed, tmp_path):
    path, _ = packed
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    manifest = json.loads((bad / DIRNAME / "manifest.json").read_text())
    stride = manifest["layers"]["0"]["stride"]
    blob = bad / DIRNAME / "layer_000.bin"
    data = bytearray(blob.read_bytes())
    for e in range(len(manifest["layers"]["0"]["xxh64"])):  # flip a byte in every expert
        data[e * stride + 100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ExpertReadError, match=r"checksum mismatch: layer 0 expert \d+ in .*layer_000.bin"):
        await flashmoe_greedy(bad, PROMPT, 2, layout="packed", io_verify=True)


async def test_stale_or_missing_pack_is_refused(packed, tmp_path):
    path, _ = packed
    stale = tmp_path / "stale"
    shutil.copytree(path, stale)
    manifest = stale / DIRNAME / "manifest.json"
    m = json.loads(manifest.read_text())
    m["source"] = {k: v + 1 for k, v in m["source"].items()}
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="changed since it was packed"):
        await flashmoe_greedy(stale, PROMPT, 1)
    shutil.rmtree(stale / DIRNAME)
    with pytest.raises(CheckpointError, match="pack the checkpoint first"):
        await flashmoe_greedy(stale, PROMPT, 1, layout="packed")
    with pytest.raises(ConfigError, match="io_verify=true needs the packed layout"):
        await flashmoe_greedy(stale, PROMPT, 1, io_verify=True)


def test_pack_refuses_to_overwrite(packed):
    path, _ = packed
    res = load_resident(path, CheckpointIndex.open(path), evaluate=False)
    with pytest.raises(CheckpointError, match="already exists"):
        write_packed(res.experts, path / DIRNAME)
