"""The scheduler alone, with a fake runner: interleaving, retiring, cancelling, the queue."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from flashmoe.serve.scheduler import QueueFull, Scheduler
from flashmoe.serve.sequence import Sequence

CHUNK = 4


@dataclass
class Report:
    kind: str
    batch: int


class FakeRunner:
    """Prefill takes ceil((len - 1)/CHUNK) calls; every token is 7. Records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def prefill(self, seq):
        await asyncio.sleep(0)
        seq.prefilled += CHUNK
        self.calls.append(("prefill", (seq.request_id,)))
        ready = seq.prefilled >= len(seq.prompt) - 1
        seq.last = seq.prompt[-1] if ready else None
        return ready, Report("prefill", 1)

    async def decode(self, seqs):
        await asyncio.sleep(0.001)
        self.calls.append(("decode", tuple(s.request_id for s in seqs)))
        return [7] * len(seqs), Report("decode", len(seqs))


class NoText:
    last_segment = ""

    def reset(self): pass
    def add_token(self, t): pass
    def finalize(self): pass


def seq(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(name, [1] * prompt_len, max_tokens, None, NoText())


async def drain(s: Sequence) -> str:
    while True:
        d = await s.events.get()
        if d.finish_reason:
            return d.finish_reason


async def test_long_prompt_prefills_between_decode_steps():
    runner = FakeRunner()
    sch = Scheduler(runner, max_batch=4, max_queue=4)
    sch.start()
    a = seq("a", 2, 8)
    sch.submit(a)
    while not any(c[0] == "decode" for c in runner.calls):
        await asyncio.sleep(0.001)
    b = seq("b", 3 * CHUNK + 1, 2)  # three chunks, then its last token decodes
    sch.submit(b)
    assert await drain(b) == "length" and await drain(a) == "length"
    await sch.close()
    at = [i for i, c in enumerate(runner.calls) if c == ("prefill", ("b",))]
    assert len(at) == 3
    between = runner.calls[at[0]:at[-1]]
    assert sum(1 for c in between if c[0] == "decode" and "a" in c[1]) >= 2  # a kept decoding


async def test_cancel_leaves_within_one_step_and_queue_limit():
    runner = FakeRunner()
    sch = Scheduler(runner, max_batch=1, max_queue=1)
    sch.start()
    a, b = seq("a", 1, 10_000), seq("b", 1, 3)
    sch.submit(a)
    sch.submit(b)  # waits: the batch holds one
    with pytest.raises(QueueFull):
        sch.submit(seq("c", 1, 3))
    while len([c for c in runner.calls if c[0] == "decode"]) < 3:
        await asyncio.sleep(0.001)
    sch.cancel(a)
    n = len(runner.calls)
    assert await drain(a) == "cancelled"
    assert sum(1 for c in runner.calls[n:] if c[0] == "decode" and "a" in c[1]) <= 1
    assert await drain(b) == "length"  # the freed place went to b
    await sch.close()
    assert a.cache is None and not sch.active and not sch.waiting
