"""Continuous batching on the event loop: admit between steps, prefill newcomers in chunks,
decode every active sequence together, retire finished and cancelled ones."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from flashmoe.serve.sequence import Delta, Sequence


class QueueFull(Exception):
    """The waiting queue is at task.max_queue."""


class Runner(Protocol):
    async def prefill(self, seq: Sequence) -> tuple[bool, Any]: ...
    async def decode(self, seqs: list[Sequence]) -> tuple[list[int], Any]: ...


class Scheduler:
    def __init__(self, runner: Runner, max_batch: int, max_queue: int,
                 on_step: Any = None, log: Any = None) -> None:
        self.runner, self.max_batch, self.max_queue = runner, max_batch, max_queue
        self.on_step, self.log = on_step, log  # on_step(StepReport): metrics
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.active: list[Sequence] = []
        self.steps = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    # ---- called by request handlers ---------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self.waiting) + self.running >= self.max_batch + self.max_queue:
            raise QueueFull(f"{self.running} sequences are running and {len(self.waiting)} "
                            f"waiting (task.max_batch={self.max_batch}, "
                            f"task.max_queue={self.max_queue})")
        self.waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves before the next step."""
        if not seq.finished:
            seq.cancelled = True
            self._wake.set()

    @property
    def running(self) -> int:
        return len(self.active) + len(self.prefilling)

    # ---- the loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="flashmoe-scheduler")

    async def close(self, cancel: bool = True) -> None:
        """Stop admitting; cancel what is left (or let it finish), then end the loop."""
        self._closing = True
        if cancel:
            for s in [*self.waiting, *self.prefilling, *self.active]:
                s.cancelled = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            self._retire()
            self._admit()
            if not (self.prefilling or self.active):
                if self._closing and not self.waiting:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except Exception as e:  # one bad step fails its sequences, not the server
                self._fail(e)

    async def _step(self) -> None:
        if self.prefilling:  # one chunk per step: a long prompt never stalls the batch
            seq = self.prefilling[0]
            ready, report = await self.runner.prefill(seq)
            self._report(report)
            if ready:  # its last prompt token is its first decode row
                self.prefilling.pop(0)
                self.active.append(seq)
        live = [s for s in self.active if not s.cancelled and not s.finished]
        if live:
            toks, report = await self.runner.decode(live)
            self._report(report)
            for seq, tok in zip(live, toks):
                if not seq.cancelled:
                    self._emit(seq, seq.accept(tok))

    def _admit(self) -> None:
        while self.waiting and self.running < self.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled:
                self._emit(seq, seq.end("cancelled"))
            else:
                self.prefilling.append(seq)

    def _retire(self) -> None:
        for group in (self.prefilling, self.active):
            for s in [s for s in group if s.cancelled or s.finished]:
                group.remove(s)
                if not s.finished:
                    self._emit(s, s.end("cancelled"))
                s.cache = None  # its KV / recurrent state goes now, not at the handler's pace
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self._emit(s, s.end("cancelled"))

    def _fail(self, e: Exception) -> None:
        if self.log is not None:
            self.log.error("step_failed", error=str(e), error_type=type(e).__name__,
                           exc_info=True)
        for s in [*self.prefilling, *self.active]:
            self._emit(s, s.end("error", f"{type(e).__name__}: {e}"))
        self.prefilling.clear()
        self.active.clear()

    def _emit(self, seq: Sequence, delta: Delta) -> None:
        seq.events.put_nowait(delta)

    def _report(self, report: Any) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(report)
