"""Slot reuse under concurrency: tiny pools rewritten every step while reads take real time
(a jittered, scribbling, short-reading reader; a prefetch's reads 20 ms slower) and the
shared expert evaluates asynchronously, with released slots poisoned at once
(tests/hostile.py). Every prompt position and decode
step must stay bit-identical to mlx-lm; and the same checks must catch, every time, the
timing bugs they exist for (a slot released before its evaluation, a prefetch not waited for,
an evaluation still running when its slots are released, injected with tests/faults.py)."""
from __future__ import annotations

import pytest

from tests.faults import Fault, inject
from tests.hostile import SlowReader, poison_on_release, slow_prefetch
from tests.parity import budget_for, first_difference, flashmoe_trace

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8, 200, 61, 3]
STEPS = 16
K = {"qwen3_5_moe": 4, "mixtral": 2}
POOLS = {  # name -> (options, slots as a multiple of K or None)
    "none": ({"cache_policy": "none"}, None),
    "lru-K": ({"cache_policy": "lru"}, 1),
    "prefetch-none": ({"cache_policy": "none", "prefetch": True}, None),
    "prefetch-lru-2K": ({"cache_policy": "lru", "prefetch": True}, 2),
}


async def hostile_run(path, family: str, pool: str, seed: int, fault: Fault | None = None,
                      steps: int = STEPS, scribble: bool = True):
    """One full trace under the hostile reader and poisoned releases (and `fault`, if any).
    scribble=False: a rewrite lands only after the delay, the old bytes stay meanwhile."""
    opts, slots = POOLS[pool]
    opts = dict(opts, io_threads=64)  # no read queues behind another: all overlap
    if slots is not None:
        opts["cache_budget_gb"] = budget_for(path, slots * K[family])
    reader = SlowReader(seed=seed, max_ms=1.0, scribble=scribble, prefetch_ms=20.0)
    with inject(fault or Fault("none")) as inj, slow_prefetch():
        def setup(engine):
            inj.attach(engine)
            poison_on_release(engine)
        try:
            got, engine = await flashmoe_trace(path, PROMPT, steps, setup=setup, reader=reader,
                                               **opts)
        except Exception as e:  # noqa: BLE001 - a fault may also crash the run: caught too
            return None, f"{type(e).__name__}: {e}", inj.fired
    return (got, engine), None, inj.fired


@pytest.mark.parametrize("family", sorted(K))
@pytest.mark.parametrize("pool", sorted(POOLS))
async def test_slot_reuse_under_slow_jittery_reads_is_exact(tiny, reference, family, pool):
    path = tiny(family)
    (got, engine), error, _ = await hostile_run(path, family, pool, seed=7)
    assert error is None, error
    assert all(s.experts_fetched > 0 for s in engine.totals.steps)  # every step rewrites slots
    assert engine.totals.steps[0].chunks > 0  # the prompt's union went through the pool in chunks
    assert first_difference(reference(path, PROMPT, STEPS), got) is None


@pytest.mark.parametrize("family", sorted(K))
@pytest.mark.parametrize("pool", ["lru-K", "prefetch-lru-2K"])
async def test_delayed_rewrites_stay_exact(tiny, reference, family, pool):
    """A delay between a slot's release and its rewrite (old bytes kept meanwhile)."""
    path = tiny(family)
    (got, _), error, _ = await hostile_run(path, family, pool, seed=11, scribble=False)
    assert error is None, error
    assert first_difference(reference(path, PROMPT, STEPS), got) is None


@pytest.mark.parametrize("kind,pools", [
    ("early_release", ["none", "prefetch-none"]),
    ("prefetch_unawaited", ["prefetch-none", "prefetch-lru-2K"]),
    ("eval_unawaited", ["none", "prefetch-none"]),
])
@pytest.mark.parametrize("family", sorted(K))
async def test_timing_bugs_are_caught_every_time(tiny, reference, family, kind, pools):
    """Each injected timing bug departs from mlx-lm (or crashes) in every run, whatever the
    reader's jitter: the checks above can fail, and do, deterministically."""
    path = tiny(family)
    ref = reference(path, PROMPT, 8)
    for pool in pools:
        for seed in range(3):
            out, error, fired = await hostile_run(path, family, pool, seed, Fault(kind), steps=8)
            assert fired, (pool, seed)
            assert error or first_difference(ref, out[0]), f"{kind} not caught: {pool} seed {seed}"
