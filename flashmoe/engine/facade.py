"""Engine: a Model with one-call generate/logits, each call a fresh Session (for scripts and
tests that run one generation at a time). Its `totals` sum those calls' sessions."""
from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Sequence

import numpy as np

from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.engine.model import Model
from flashmoe.engine.options import EngineOptions
from flashmoe.engine.session import TokenEvent, Totals
from flashmoe.models.loader import Resident
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.sampling import Sampler


class Engine(Model):
    def __init__(self, path: Path, options: EngineOptions, worker: MlxWorker,
                 index: CheckpointIndex, resident: Resident) -> None:
        super().__init__(path, options, worker, index, resident)
        self.totals = Totals()

    async def generate(self, prompt: Sequence[int], max_tokens: int,
                       sampler: Sampler | None = None,
                       stop: Sequence[int] = ()) -> AsyncIterator[TokenEvent]:
        session = self.session(sampler, totals=self.totals)
        async for ev in session.generate(prompt, max_tokens, stop):
            yield ev

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        return await self.session(totals=self.totals).logits(ids)
