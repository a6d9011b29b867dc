"""SamplingStage: next token from the last position's logits with mlx-lm's sampler."""
from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx

from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.messages import StepStats

Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> Sampler:
    """mlx-lm's own sampler (greedy argmax when temperature is 0: marked `pure`, it draws no
    random numbers, so a step may sample before it knows it will keep the token)."""
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    sampler = mlx_lm_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    if temperature == 0:
        sampler.pure = True
    return sampler


class SamplingStage:
    def __init__(self, worker: MlxWorker) -> None:
        self.worker = worker

    async def __call__(self, logits: mx.array, sampler: Sampler, stats: StepStats) -> int:
        """The sampler is the session's: sessions on one model sample independently."""
        t0 = time.perf_counter()
        tok = await self.worker.numpy(_sample, logits, sampler)
        stats.sampling_ms += (time.perf_counter() - t0) * 1e3
        return int(tok[0].reshape(-1)[0])



def _sample(logits: mx.array, sampler: Sampler) -> tuple[mx.array]:
    return (sample_graph(logits, sampler),)


def sample_graph(logits: mx.array, sampler: Sampler) -> mx.array:
    """The next token from the last position's logits, as mlx-lm samples: the sampler gets
    log-probabilities (not evaluated; the whole-token step builds it into its own trip)."""
    last = logits[:, -1, :]
    return sampler(last - mx.logsumexp(last, axis=-1, keepdims=True))
