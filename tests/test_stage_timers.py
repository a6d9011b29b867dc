"""The stage timers measure their stages: slow reads show in expert_fetch_ms only, and the
stage keys never add up to more than the step took."""
from __future__ import annotations

import os
import time

from flashmoe.engine import Engine, EngineOptions
from flashmoe.tasks.common import STAGE_KEYS

DELAY_S = 0.004


def _slow_reader(fd: int, bufs: list, offset: int) -> int:
    time.sleep(DELAY_S)
    return os.preadv(fd, bufs, offset)


async def test_slow_reads_are_charged_to_expert_fetch_only(tiny):
    path = tiny("qwen3_moe")
    fast = await Engine.open(path, EngineOptions(io_threads=1), tokenizer=False)
    slow = await Engine.open(path, EngineOptions(io_threads=1, reader=_slow_reader),
                             tokenizer=False)
    try:
        runs = {}
        for name, model in (("fast", fast), ("slow", slow)):
            t0 = time.perf_counter()
            evs = [ev async for ev in model.session().generate([5, 99, 310], 4)]
            runs[name] = (evs, (time.perf_counter() - t0) * 1e3)
        for evs, wall_ms in runs.values():
            assert sum(ev.stats[k] for ev in evs for k in STAGE_KEYS) <= wall_ms
            assert not {"attention_ms", "router_ms"} & evs[0].stats.keys()
        slow_evs, fast_evs = runs["slow"][0], runs["fast"][0]
        reads = sum(1 for ev in slow_evs for _ in range(ev.stats["experts_fetched"]))
        assert reads and all(ev.stats["bytes_read"] for ev in slow_evs[:1])
        fetch = [sum(ev.stats["expert_fetch_ms"] for ev in e) for e in (slow_evs, fast_evs)]
        trips = [sum(ev.stats["device_trip_ms"] for ev in e) for e in (slow_evs, fast_evs)]
        # every expert is >= 1 read of DELAY_S (9 parts each); the device trips do not grow
        assert fetch[0] - fetch[1] >= reads * DELAY_S * 1e3 * 0.9
        assert trips[0] < trips[1] + reads * DELAY_S * 1e3 * 0.5
    finally:
        await fast.aclose()
        await slow.aclose()
