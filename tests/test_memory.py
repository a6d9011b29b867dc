"""The routed experts are never all resident: RSS grows by the resident part + slots only."""
from __future__ import annotations

import json
import subprocess
import sys

from flashmoe.checkpoints.safetensors_index import CheckpointIndex

BIG_EXPERTS = {"hidden_size": 512, "moe_intermediate_size": 512, "intermediate_size": 512,
               "num_experts": 64, "num_hidden_layers": 4}
MARGIN_BYTES = 40e6  # MLX temporaries, KV cache, allocator slack

PROBE = r"""
import asyncio, json, sys
import psutil
from flashmoe.engine import Engine, EngineOptions
import mlx_lm.utils, mlx_lm.models.qwen3_moe  # imports are not the model's memory

async def main():
    before = psutil.Process().memory_info().rss
    engine = await Engine.open(sys.argv[1], EngineOptions(), tokenizer=False)
    toks = [ev.token_id async for ev in engine.generate(list(range(1, 40)), 24)]
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork+exec
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    peak = int(hwm.split()[1]) * 1024
    print(json.dumps({"growth": peak - before, "slots": engine.slot_bytes, "n": len(toks)}))
    await engine.aclose()

asyncio.run(main())
"""


def test_peak_rss_stays_under_resident_plus_slots(tiny):
    path = tiny("qwen3_moe", **BIG_EXPERTS)
    index = CheckpointIndex.open(path)
    expert = sum(t.nbytes for n, t in index.tensors.items() if ".switch_mlp." in n)
    resident = sum(t.nbytes for n, t in index.tensors.items() if ".switch_mlp." not in n)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert expert >= 4 * got["slots"], "fixture too small to show anything"
    bound = resident + got["slots"] + MARGIN_BYTES
    assert got["growth"] < bound, (
        f"RSS grew {got['growth'] / 1e6:.1f} MB; resident {resident / 1e6:.1f} MB + slots "
        f"{got['slots'] / 1e6:.1f} MB + margin; experts on disk {expert / 1e6:.1f} MB")
    assert expert > bound - resident, "bound must be tighter than loading all experts"
