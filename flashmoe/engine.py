"""The Python API: open a checkpoint, stream tokens. The CLI, bench and ppl tasks use it.

    engine = await Engine.open("path/to/checkpoint", EngineOptions(io_split=4))
    async for ev in engine.generate(engine.encode("Hello"), max_tokens=32):
        print(engine.decode([ev.token_id]), end="")
    await engine.aclose()
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import mlx.core as mx
import numpy as np

from flashmoe.errors import CheckpointError, ConfigError
from flashmoe.models.loader import Resident, load_resident
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.io_pool import IOPool, Reader
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.safetensors_index import CheckpointIndex
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.messages import StepStats
from flashmoe.stages.pipeline import Pipeline
from flashmoe.stages.sampling import Sampler, make_sampler

GIB = 2**30  # *_gb config keys are GiB, as RAM is reported
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Everything the engine needs; the Hydra config maps onto this one to one."""

    experts_per_token: int | None = None  # None: the model's own K
    io_split: int = 1
    io_threads: int = 4
    io_retries: int = 3
    io_direct: bool = False  # O_DIRECT reads via aligned bounce buffers (skips the page cache)
    io_verify: bool = False  # check each read expert's xxh64 (needs the packed layout)
    layout: str = "auto"  # auto | original | packed (auto: packed when <ckpt>/flashmoe-packed exists)
    cache_policy: str = "lru"
    cache_budget_gb: float | None = None  # None: the minimum, two tokens' worth of slots
    prefetch: bool = False  # speculative read of the next layer's likely experts
    device: str = "cpu"
    dtype: str | None = None  # activations; None keeps the checkpoint's dtype (mlx-lm parity)
    reader: Reader | None = None  # injectable pread, for fault tests
    on_io_retry: Callable[..., None] | None = None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and what producing it cost."""

    token_id: int
    position: int
    stats: dict
    elapsed_s: float


@dataclass(slots=True)
class Totals:
    """Running sums over a generation, for the run summary."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list)


class Engine:
    def __init__(self, path: Path, options: EngineOptions, worker: MlxWorker, index: CheckpointIndex,
                 resident: Resident) -> None:
        self.path, self.options, self.worker, self.index = path, options, worker, index
        self.resident = resident
        self.num_experts = resident.num_experts
        self.k = options.experts_per_token or resident.experts_per_token
        if not 1 <= self.k <= self.num_experts:
            raise ConfigError(f"model.experts_per_token={self.k} must be between 1 and "
                              f"{self.num_experts} (this model's experts per layer)")
        self.pools = self._make_pools()  # config errors first: nothing to close yet
        self.io = IOPool(options.io_threads, options.io_split, options.io_retries,
                         reader=options.reader, on_retry=options.on_io_retry)
        try:
            self.store = ExpertStore(resident.experts, self._packed(), direct=options.io_direct)
        except BaseException:
            self.io.close()
            raise
        self.tokenizer: Any = None
        self.totals = Totals()
        dtype = DTYPES.get(options.dtype) if options.dtype else None
        self.pipeline = Pipeline(resident, worker, self.store, self.pools, self.io, self.k,
                                 make_sampler(), dtype, verify=options.io_verify,
                                 prefetch=options.prefetch)

    @classmethod
    async def open(cls, path: str | Path, options: EngineOptions | None = None,
                   tokenizer: bool = True) -> "Engine":
        """Validate headers, load the resident part in the MLX thread, allocate slots."""
        path, options = Path(path), options or EngineOptions()
        index = CheckpointIndex.open(path)
        worker = MlxWorker(options.device)
        try:
            resident = await worker.build(load_resident, path, index,
                                          DTYPES.get(options.dtype) if options.dtype else None)
            engine = cls(path, options, worker, index, resident)
        except BaseException:
            worker.close()
            raise
        if tokenizer:
            from mlx_lm.utils import load_tokenizer

            if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
                await engine.aclose()
                raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model; the "
                                      "checkpoint's tokenizer files are missing (re-download them)")
            engine.tokenizer = load_tokenizer(path)
        return engine

    def _packed(self) -> dict | None:
        """The packed layout's per-layer blobs, or None to read the original safetensors."""
        from flashmoe.runtime.packed import DIRNAME, read_manifest

        root, layout = self.path / DIRNAME, self.options.layout
        if layout not in ("auto", "original", "packed"):
            raise ConfigError(f"io.layout={layout} must be one of auto, original, packed")
        use = layout == "packed" or (layout == "auto" and (root / "manifest.json").is_file())
        if layout == "packed" and not (root / "manifest.json").is_file():
            raise CheckpointError(f"io.layout=packed but {root}/manifest.json does not exist; "
                                  "run `python -m flashmoe task=pack model.path=...` first")
        if self.options.io_verify and not use:
            raise ConfigError("io.verify=true needs the packed layout, whose manifest carries "
                              "the checksums; run task=pack first or set io.verify=false")
        return read_manifest(root, self.resident.experts) if use else None

    def _make_pools(self) -> dict[int, SlotPool]:
        """One pool per distinct expert layout, sized by cache.budget_gb."""
        groups: dict[tuple, list[int]] = {}
        for i, le in self.resident.experts.items():
            groups.setdefault(le.signature, []).append(i)
        pools: dict[int, SlotPool] = {}
        budget = self.options.cache_budget_gb
        for sig, layers in groups.items():
            spec = self.resident.experts[layers[0]]
            if budget is None or self.options.cache_policy == "none":
                n = 2 * self.k  # no app cache: double-buffered slots, the OS caches pages
            else:
                n = int(budget * GIB / len(groups) // spec.expert_nbytes)
            if n < self.k:
                need = self.k * spec.expert_nbytes * len(groups) / GIB
                raise ConfigError(
                    f"cache.budget_gb={budget} holds {n} experts of {spec.expert_nbytes / 2**20:.2f} MiB "
                    f"but one layer needs {self.k} (experts_per_token); use at least {need:.3g}")
            n = min(n, self.num_experts * len(layers))
            pool = SlotPool(spec, n, self.options.cache_policy,
                            upcast=self.options.dtype == "float32")
            pools.update({i: pool for i in layers})
        return pools

    def unique_pools(self) -> list[SlotPool]:
        """Each pool once (layers with one expert layout share a pool)."""
        return list({id(p): p for p in self.pools.values()}.values())

    @property
    def slot_bytes(self) -> int:
        return sum(p.nbytes for p in self.unique_pools())

    def new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return self.worker.call(lambda: make_prompt_cache(self.resident.model))

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat and getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True))
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    async def logits(self, ids: Sequence[int], cache: list[Any] | None = None) -> np.ndarray:
        """Logits for every position of `ids` [L, V] (float32), for tests, ppl and KL."""
        cache = cache if cache is not None else self.new_cache()
        stats = StepStats()
        out = await self.pipeline.forward(list(ids), cache, stats, all_logits=True)
        self.totals.steps.append(stats)
        (arr,) = await self.worker.numpy(lambda: (out[0].astype(mx.float32),))
        return arr

    async def generate(self, prompt: Sequence[int], max_tokens: int,
                       sampler: Sampler | None = None,
                       stop: Sequence[int] = (), cache: list[Any] | None = None,
                       ) -> AsyncIterator[TokenEvent]:
        """Prompt in one exact pass, then one token per step; yields as tokens arrive.

        `cache` (from new_cache) continues a session: `prompt` is then only the new tokens.
        It ends holding everything fed, i.e. all yielded tokens but the last."""
        if max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens} must be at least 1")
        if not prompt:
            raise ConfigError("prompt is empty (0 tokens); give some text, e.g. prompt=\"Hello\"")
        if sampler is not None:
            self.pipeline.sampling.sampler = sampler
        cache = cache if cache is not None else self.new_cache()
        ids, t_start = list(prompt), time.perf_counter()
        for n in range(max_tokens):
            stats, t0 = StepStats(), time.perf_counter()
            logits = await self.pipeline.forward(ids, cache, stats)
            tok = await self.pipeline.sample(logits, stats)
            dt = time.perf_counter() - t0
            self._account(n == 0, len(ids), dt, stats)
            yield TokenEvent(tok, len(prompt) + n, stats.as_dict(), time.perf_counter() - t_start)
            if tok in stop:
                return
            ids = [tok]

    def _account(self, first: bool, n_ids: int, dt: float, stats: StepStats) -> None:
        t = self.totals
        if first:
            t.prompt_tokens, t.prompt_s = t.prompt_tokens + n_ids, t.prompt_s + dt
        else:
            t.decode_tokens, t.decode_s = t.decode_tokens + 1, t.decode_s + dt
        t.steps.append(stats)

    def reset_cache(self) -> None:
        """Empty the expert cache (slots), e.g. before a cold measurement."""
        for pool in self.unique_pools():
            pool.clear()

    def cache_stats(self) -> tuple[int, int]:
        pools = self.unique_pools()
        return sum(p.hits for p in pools), sum(p.misses for p in pools)

    async def aclose(self) -> None:
        self.io.close()
        self.store.close()
        self.worker.close()
