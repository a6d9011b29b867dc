"""The Model: one opened checkpoint, shared by any number of sessions.

    model = await Model.open("path/to/checkpoint", EngineOptions(io_split=4))
    session = model.session()
    async for ev in session.generate(model.encode("Hello"), max_tokens=32):
        print(model.decode([ev.token_id]), end="")
    await model.aclose()

It holds what does not change between generations: the resident weights, the expert store,
the slot pools (the expert cache), the I/O pool and the MLX thread. Per-generation state
(KV cache, sampler, stats) lives in a Session.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import aiofiles.os
import mlx.core as mx

from flashmoe.engine.options import EngineOptions
from flashmoe.engine.session import Session, Totals
from flashmoe.constants import GIB
from flashmoe.errors import CheckpointError, OptionError
from flashmoe.models.loader import Resident, load_resident
from flashmoe.runtime import cuda_copy
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.host_tier import HostTier
from flashmoe.runtime.io_pool import INLINE_BYTES, IOPool
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.runtime.platform_io import metal_buffer_limit
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.runtime.slot_pool import SlotPool
from flashmoe.stages.observer import ReadObserver
from flashmoe.stages.pipeline import Pipeline
from flashmoe.stages.sampling import Sampler

# MLX CUDA's gather_qmm (its qmm path, rows x k >= 8) addresses an expert stack with 32-bit
# byte offsets: an expert past 2 GiB of a slot array is read from the wrong place (measured on
# the H200: bench/gpu_qmm_paths.py --overflow, RELIABILITY.md). No slot array is larger.
MAX_SLOT_ARRAY_BYTES = 2**31


def max_slot_array_bytes(device_info: Callable[[], dict] | None = None) -> int:
    """The largest one slot array may be: 2 GiB, or less under Metal's max buffer length
    (one Metal buffer per array; ~27 GB on a 48 GB M4 Pro, so rarely the binding one)."""
    metal = metal_buffer_limit(device_info)
    return min(MAX_SLOT_ARRAY_BYTES, metal) if metal else MAX_SLOT_ARRAY_BYTES

T = TypeVar("T")


class Model:
    def __init__(self, path: Path, options: EngineOptions, worker: MlxWorker, index: CheckpointIndex,
                 resident: Resident) -> None:
        self.path, self.options, self.worker, self.index = path, options, worker, index
        self.resident = resident
        self.num_experts = resident.num_experts
        options.check()
        self.k = options.experts_per_token or resident.experts_per_token
        if not 1 <= self.k <= self.num_experts:
            raise OptionError("experts_per_token", self.k, f"must be between 1 and "
                              f"{self.num_experts} (this model's experts per layer)")
        # None: preads straight into the slots (the path measured exact on the H200); the
        # CUDA only (a capability check; io.cuda_copy=false keeps the plain path there too)
        self.cuda = cuda_copy.select(worker.device) if options.cuda_copy else None
        self.pools = self._make_pools()  # config errors first: nothing to close yet
        # O_DIRECT reads block even with RWF_NOWAIT: no inline pass for them
        self.io = IOPool(options.io_threads, options.io_split, options.io_retries,
                         reader=options.reader, on_retry=options.on_io_retry,
                         inline_bytes=0 if options.io_direct else INLINE_BYTES)
        try:
            self.store = ExpertStore(resident.experts, self._packed(), direct=options.io_direct,
                                     readahead=options.io_readahead)
        except BaseException:
            self.io.close()
            raise
        self.tokenizer: Any = None
        self.pipeline = Pipeline(resident, worker, self.store, self.pools, self.io, self.k,
                                 options.mx_dtype, verify=options.io_verify,
                                 prefetch=options.prefetch, parallel=options.parallel)
        # one step at a time on the shared slots and MLX thread; sessions take turns
        self.step_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, options: EngineOptions | None = None,
                   tokenizer: bool = True) -> "Model":
        """Validate headers, load the resident part in the MLX thread, allocate slots."""
        path, options = Path(path), options or EngineOptions()
        # headers and config off the event loop; expert bytes later go through the I/O pool
        index = await asyncio.to_thread(CheckpointIndex.open, path)
        worker = MlxWorker(options.device)
        try:
            if options.parallel is not None:  # refuse mismatched ranks before loading anything
                await options.parallel.agree(worker.run, start_digests(index, options))
            resident = await worker.build(load_resident, path, index, options.mx_dtype, True,
                                          options.experts_per_token)
            engine = cls(path, options, worker, index, resident)
        except BaseException:
            worker.close()
            raise
        if tokenizer:
            from mlx_lm.utils import load_tokenizer

            if not any([await aiofiles.os.path.isfile(path / f)
                        for f in ("tokenizer.json", "tokenizer.model")]):
                await engine.aclose()
                raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model; the "
                                      "checkpoint's tokenizer files are missing (re-download them)")
            engine.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        return engine

    def _packed(self) -> dict | None:
        """The packed layout's per-layer blobs, or None to read the original safetensors."""
        from flashmoe.checkpoints.packed import DIRNAME, read_manifest

        root, layout = self.path / DIRNAME, self.options.layout
        use = layout == "packed" or (layout == "auto" and (root / "manifest.json").is_file())
        if layout == "packed" and not (root / "manifest.json").is_file():
            raise CheckpointError(f"the packed layout was asked for but {root}/manifest.json "
                                  "does not exist; pack the checkpoint first "
                                  "(`python -m flashmoe task=pack model.path=...`)")
        if self.options.io_verify and not use:
            raise OptionError("io_verify", "true", "needs the packed layout, whose manifest "
                              "carries the checksums; pack the checkpoint first or turn "
                              "verification off")
        return read_manifest(root, self.resident.experts) if use else None

    def _make_pools(self) -> dict[int, SlotPool]:
        """One pool per distinct expert layout, sized by cache.budget_gb."""
        groups: dict[tuple, list[int]] = {}
        for i, le in self.resident.experts.items():
            groups.setdefault(le.signature, []).append(i)
        pools: dict[int, SlotPool] = {}
        budget = self.options.cache_budget_gb
        for layers in groups.values():
            spec = self.resident.experts[layers[0]]
            if budget is None or self.options.cache_policy == "none":
                n = 2 * self.k  # no app cache: double-buffered slots, the OS caches pages
            else:
                n = int(budget * GIB / len(groups) // spec.expert_nbytes)
            if n < self.k:
                need = self.k * spec.expert_nbytes * len(groups) / GIB
                raise OptionError(
                    "cache_budget_gb", budget, f"holds {n} experts of "
                    f"{spec.expert_nbytes / 2**20:.2f} MiB but one layer needs {self.k} "
                    f"(experts_per_token); use at least {need:.3g}")
            n = min(n, self.experts_owned * len(layers))
            host_n = self._host_rows(spec, len(groups), self.experts_owned * len(layers))
            blocks = split_under_cap(layers, n, self._slot_cap(spec))
            for group, slots in blocks:
                host = HostTier([p.nbytes for p in spec.parts], host_n // len(blocks),
                                cuda_copy.host_allocator(self.cuda), self.cuda)
                pool = SlotPool(spec, slots, self.options.cache_policy,
                                upcast=self.options.dtype == "float32", host=host,
                                cuda=self.cuda, clean_ahead=self._clean_ahead())
                pools.update({i: pool for i in group})
        return pools

    @property
    def experts_owned(self) -> int:
        """Experts per MoE layer this process reads and caches (its share when several ranks
        split them; the cache budget covers only those)."""
        par = self.options.parallel
        return len(par.share(self.num_experts)) if par is not None else self.num_experts

    def _host_rows(self, spec, groups: int, experts: int) -> int:
        """Host-tier rows for one expert layout: its share of cache.host_budget_gb, no more
        than its experts. Rows beyond the experts the slots cannot hold keep the copies that
        promotions leave (host_tier.py): the next demotion of those experts is free."""
        budget = self.options.cache_host_budget_gb
        if not budget or self.options.cache_policy == "none":
            return 0
        return max(0, min(int(budget * GIB / groups // spec.expert_nbytes), experts))

    def _clean_ahead(self) -> int:
        """cache.clean_ahead with CUDA copies: the next victims' experts copied out on the
        device-to-host stream (SlotPool._clean_ahead), beside the copies in and the compute.
        Without them a copy out is a host memcpy on the critical path either way: 0."""
        return self.options.cache_clean_ahead if self.cuda is not None else 0

    def _slot_cap(self, spec) -> int:
        """Most slots one pool may hold: each part's slot array stays within 2 GiB (and
        Metal's buffer limit); larger budgets are split into pools (split_under_cap)."""
        widen = 2 if self.options.dtype == "float32" else 1  # bf16/f16 parts held as f32
        largest = max(p.nbytes * (widen if p.dtype in (mx.bfloat16, mx.float16) else 1)
                      for p in spec.parts)
        return max(1, max_slot_array_bytes() // largest)

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

    @property
    def config(self) -> dict:
        """The checkpoint's config.json."""
        return self.resident.config

    @property
    def files(self) -> list[Path]:
        """The files expert bytes are read from (for page-cache dropping)."""
        return list(self.store.files)

    @property
    def device(self) -> str:
        """Where MLX runs: "gpu" or "cpu" (a GPU profile on a CPU-only build runs on the CPU)."""
        return self.worker.device

    @property
    def requested_device(self) -> str:
        return self.worker.requested

    async def evaluated_in_mlx_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the model's MLX thread and evaluate what it returns (collectives)."""
        return await self.worker.run(fn, *args)

    async def in_mlx_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the model's MLX thread (e.g. a reference model beside it); return
        values are not evaluated: convert them there (np.array) if they must be."""
        return await self.worker.build(fn, *args)

    def session(self, sampler: Sampler | None = None, observer: ReadObserver | None = None,
                read_experts: bool = True, totals: Totals | None = None) -> Session:
        """A new generation on this model (its own KV cache, sampler and stats)."""
        return Session(self, sampler, observer, read_experts, totals)

    def reset_cache(self) -> None:
        """Empty the expert cache (slots), e.g. before a cold measurement."""
        for pool in self.unique_pools():
            pool.clear()

    def cache_stats(self) -> tuple[int, int]:
        """(slot hits, disk reads) over the model's life."""
        pools = self.unique_pools()
        return sum(p.hits for p in pools), sum(p.misses for p in pools)

    def host_hits(self) -> int:
        """Misses of the slots served by the host tier (cache.host_budget_gb)."""
        return sum(p.host_hits for p in self.unique_pools())

    def host_demotions(self) -> tuple[int, int, int]:
        """(experts copied out to the host tier as they left the slots, experts whose kept
        copy made that free, copies made ahead of an eviction: SlotPool._clean_ahead)."""
        pools = self.unique_pools()
        return (sum(p.host_demotions[0] for p in pools), sum(p.host_demotions[1] for p in pools),
                sum(p.host_stashed for p in pools))

    async def aclose(self) -> None:
        self.io.close()
        self.store.close()
        if self.cuda is not None:
            self.cuda.close()
        self.worker.close()


def start_digests(index: CheckpointIndex, options: EngineOptions) -> list[tuple[str, bytes]]:
    """What every rank must share: the checkpoint (config.json and tensor headers), the
    options that change the numbers, and the task's own settings."""
    from flashmoe.runtime.dist import digest

    headers = sorted((n, t.dtype, t.shape, t.nbytes) for n, t in index.tensors.items())
    numerics = (options.experts_per_token, options.dtype, options.device)
    return [("checkpoint (config.json + safetensors headers)", digest(index.config, headers)),
            ("engine setting (experts_per_token, dtype, device)", digest(*numerics)),
            ("task config (prompt, sampling, task keys)", digest(options.run_context))]


def split_under_cap(layers: list[int], n: int, cap: int) -> list[tuple[list[int], int]]:
    """Share `n` slots among pools of at most `cap` slots, each serving a block of layers."""
    if n <= cap:
        return [(layers, n)]
    count = min(-(-n // cap), len(layers))
    blocks = [layers[i * len(layers) // count:(i + 1) * len(layers) // count]
              for i in range(count)]
    return [(block, min(cap, n // count)) for block in blocks]
