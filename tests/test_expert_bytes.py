"""Every byte of every fetched expert equals the tensor mlx-lm loads (no off-by-one)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.engine import Engine, EngineOptions
from flashmoe.runtime.io_pool import PAGE, ReadJob, split_job
from flashmoe.stages.messages import StepStats
from tests.hostile import SlowReader


@pytest.mark.parametrize("split", [1, 3, 5, 8])
async def test_fetched_slots_match_mlx_lm_tensors(wide, split):
    """Through reads cut in pieces (128 KiB weight parts) the slots hold mlx-lm's exact bytes."""
    from mlx_lm import load

    path = wide("qwen3_moe")
    model, _ = load(str(path))
    reader = SlowReader(max_ms=0, scribble=True, short=False)  # scribbled first: no stale pass
    engine = await Engine.open(path, EngineOptions(io_split=split, io_threads=3, reader=reader,
                                                   cache_budget_gb=1.0), tokenizer=False)
    try:
        for li, le in engine.resident.experts.items():
            glu = model.model.layers[li].mlp.switch_mlp
            experts = list(range(le.num_experts))
            fetched = await engine.pipeline.fetch(li, experts, StepStats())
            w = engine.pools[li].store.weights()
            for part in le.parts:
                proj, field = part.key.split(".")
                want = np.array(glu[proj][field].view(mx.uint8) if field == "weight"
                                else glu[proj][field])
                for e, s in fetched.grant.slots.items():
                    got = np.array(w[part.key][s])
                    assert got.tobytes() == want[e].tobytes(), (li, e, part.key, split)
            engine.pools[li].release(fetched.grant)
    finally:
        await engine.aclose()
    assert (max(reader.sizes) == 128 * 1024) == (split == 1)  # split > 1 cut every weight part


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 12345])
@pytest.mark.parametrize("size", [1, 4096, 10_000, 65_537, 1_000_003])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_split_covers_range_exactly_with_page_aligned_cuts(offset, size, n):
    dest = np.zeros(size, dtype=np.uint8)
    chunks = split_job(ReadJob(0, offset, dest, "x"), n)
    assert len(chunks) <= n
    pos = offset
    for c in chunks:
        assert c.offset == pos and c.dest.nbytes > 0
        pos += c.dest.nbytes
    assert pos == offset + size
    for c in chunks[1:]:
        assert c.offset % PAGE == 0
