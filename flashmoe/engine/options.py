"""EngineOptions: everything a model needs, in the engine's own words (no config keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from flashmoe.constants import CACHE_POLICIES, DEVICES, IO_RETRIES, IO_SPLIT, IO_THREADS, LAYOUTS
from flashmoe.errors import OptionError
from flashmoe.runtime.dist import ExpertParallel
from flashmoe.runtime.io_pool import Reader

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
    io_readahead: bool = False  # kernel readahead on expert files (off: each read its range)
    cuda_copy: bool = True  # CUDA: pinned staging + cuMemcpyHtoDAsync (a no-op elsewhere)
    layout: str = "auto"  # auto | original | packed (auto: packed when <ckpt>/flashmoe-packed exists)
    cache_policy: str = "lru"
    cache_budget_gb: float | None = None  # None: the minimum, two tokens' worth of slots
    cache_host_budget_gb: float = 0.0  # host-RAM tier behind the slots (0: none)
    cache_clean_ahead: int = 32  # CUDA copies + lru tier: victims copied out ahead (0: off)
    prefetch: bool = False  # speculative read of the next layer's likely experts
    device: str = "cpu"
    dtype: str | None = None  # activations; None keeps the checkpoint's dtype (mlx-lm parity)
    reader: Reader | None = None  # injectable pread, for fault tests
    on_io_retry: Callable[..., None] | None = None
    parallel: ExpertParallel | None = None  # several ranks: this one's share of the experts
    run_context: str = ""  # what every rank must agree on beyond the checkpoint (task config)

    def check(self) -> None:
        """Ranges and sets, in the engine's words; checkpoint-dependent limits come at open."""
        for name, (lo, hi) in (("io_split", IO_SPLIT), ("io_threads", IO_THREADS),
                               ("io_retries", IO_RETRIES)):
            value = getattr(self, name)
            if not (isinstance(value, int) and lo <= value <= hi):
                raise OptionError(name, value, f"must be between {lo} and {hi}")
        for name, allowed in (("cache_policy", CACHE_POLICIES), ("layout", LAYOUTS),
                              ("device", DEVICES), ("dtype", (None, *DTYPES))):
            if getattr(self, name) not in allowed:
                raise OptionError(name, getattr(self, name),
                                  "must be one of " + ", ".join(str(a) for a in allowed))
        if self.cache_budget_gb is not None and self.cache_budget_gb < 0:
            raise OptionError("cache_budget_gb", self.cache_budget_gb, "must be at least 0")
        if self.cache_host_budget_gb < 0:
            raise OptionError("cache_host_budget_gb", self.cache_host_budget_gb,
                              "must be at least 0")
        if not (isinstance(self.cache_clean_ahead, int) and self.cache_clean_ahead >= 0):
            raise OptionError("cache_clean_ahead", self.cache_clean_ahead,
                              "must be a whole number, at least 0 (0: off)")

    @property
    def mx_dtype(self) -> mx.Dtype | None:
        return DTYPES.get(self.dtype) if self.dtype else None
