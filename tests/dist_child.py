"""One rank of a 2-rank loopback run (tests/test_dist.py starts two of these).

argv: out path ({rank} filled in), then a JSON list of jobs {"path", "prompt", "steps", **EngineOptions}.
Writes each job's greedy tokens, last-position logits, bytes read and expert share."""
from __future__ import annotations

import asyncio
import json
import os
import sys

from flashmoe.engine import Engine, EngineOptions
from flashmoe.runtime.dist import ExpertParallel


async def one(par: ExpertParallel, job: dict) -> dict:
    path, prompt, steps = job.pop("path"), job.pop("prompt"), job.pop("steps")
    engine = await Engine.open(path, EngineOptions(parallel=par, **job), tokenizer=False)
    try:
        last = (await engine.logits(prompt))[-1]
        toks = [ev.token_id async for ev in engine.generate(prompt, steps)]
        if os.environ.get("DIST_TEST_DIE") == str(par.rank):  # the killed-rank test
            os.kill(os.getpid(), 9)
    finally:
        await engine.aclose()
    share = par.share(engine.num_experts)
    return {"tokens": toks, "last": last.tolist(), "share": [share.start, share.stop],
            "bytes_read": sum(s.bytes_read for s in engine.totals.steps),
            "chunks": sum(s.chunks for s in engine.totals.steps)}


async def main() -> None:
    out, jobs = sys.argv[1], json.loads(sys.argv[2])
    par = ExpertParallel.detect("expert", "ring", timeout_s=float(os.environ.get(
        "DIST_TEST_TIMEOUT", "60")), connect_s=30)
    assert par is not None
    res = [await one(par, dict(j)) for j in jobs]
    with open(out.format(rank=par.rank), "w") as f:
        json.dump({"rank": par.rank, "jobs": res}, f)


if __name__ == "__main__":
    asyncio.run(main())
