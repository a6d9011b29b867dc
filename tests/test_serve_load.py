"""Bounded load: 16 concurrent openai clients × 25 mixed requests (make soak: × 250)."""
from __future__ import annotations

import asyncio
import os
import random

import psutil
import pytest
from openai import AsyncOpenAI

from tests.serve_util import KEY, start_server

CLIENTS = 16


async def _client(srv, i: int, n: int, rss: list[float]) -> int:
    rng = random.Random(i)
    c = AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    proc = psutil.Process(srv.proc.pid)
    ok = 0
    async with c:
        for j in range(n):
            words = " ".join(rng.choice(["sea", "map", "light", "keeper", "wave"])
                             for _ in range(rng.randint(1, 40)))
            max_tokens = rng.randint(1, 12)
            if rng.random() < 0.5:
                parts = [ch.choices[0].text async for ch in await c.completions.create(
                    model=srv.model, prompt=words, max_tokens=max_tokens, stream=True)
                    if ch.choices]
                assert 1 <= len(parts) <= max_tokens + 1
            else:
                res = await c.chat.completions.create(
                    model=srv.model, messages=[{"role": "user", "content": words}],
                    max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]), seed=j)
                assert res.choices[0].finish_reason in ("stop", "length")
                assert 1 <= res.usage.completion_tokens <= max_tokens
                assert isinstance(res.choices[0].message.content, str)
            ok += 1
            rss.append(proc.memory_info().rss)
    return ok


async def _load(tiny, tmp_path, per_client: int):
    srv = start_server(tiny("qwen3_5_moe"), tmp_path / "srv", "task.max_batch=8")
    try:
        # warm-up (not measured): allocator and buffer caches fill to their working size first
        await asyncio.gather(*(_client(srv, 100 + i, 3, []) for i in range(CLIENTS)))
        rss: list[float] = []
        done = await asyncio.gather(*(_client(srv, i, per_client, rss) for i in range(CLIENTS)))
        assert sum(done) == CLIENTS * per_client  # zero failures
        q = len(rss) // 4
        first, last = sum(rss[:q]) / q, sum(rss[-q:]) / q
        assert (last - first) / first < 0.05, f"RSS grew {first / 2**20:.1f} -> {last / 2**20:.1f} MiB"
        m = srv.metrics()
        assert m["flashmoe_slots_pinned"] == 0 and m["flashmoe_active_sequences"] == 0
        assert m["flashmoe_batch_size"] >= 1
    finally:
        assert srv.stop() == 0
    (summary,) = srv.events("run_summary")
    assert summary["requests_ok"] == CLIENTS * (per_client + 3)
    assert summary["mean_batch"] > 1.5  # requests were really batched
    return summary


@pytest.mark.slow
async def test_load_16_clients(tiny, tmp_path):
    await _load(tiny, tmp_path, 25)


@pytest.mark.soak
async def test_soak(tiny, tmp_path):
    await _load(tiny, tmp_path, int(os.environ.get("FLASHMOE_SOAK_REQUESTS", "250")))
