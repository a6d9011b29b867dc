"""The one thread that builds and evaluates MLX graphs; coroutines await it, never block."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import mlx.core as mx
import numpy as np

T = TypeVar("T")


class MlxWorker:
    """Runs `fn` in a dedicated thread and evaluates what it returns before handing it back."""

    def __init__(self, device: str = "cpu") -> None:
        # a profile asking for a GPU on a CPU-only MLX build runs on the CPU (and says so)
        self.requested = device
        self.device = "gpu" if device == "gpu" and mx.is_available(mx.gpu) else "cpu"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashmoe-mlx",
                                        initializer=self._init_thread)

    def _init_thread(self) -> None:
        mx.set_default_device(mx.gpu if self.device == "gpu" else mx.cpu)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Build with fn(*args) in the MLX thread, mx.eval the result, return it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._eval, fn, args)

    async def build(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the MLX thread without evaluating (graphs, masks, caches)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args))

    async def numpy(self, fn: Callable[..., Any], *args: Any,
                    background: Callable[[], Any] | None = None) -> Any:
        """Evaluate fn(*args) -> (array, *rest); return (np.ndarray, *rest) with rest evaluated.

        `background()` is then built and started asynchronously in the same trip; its
        result is appended to the returned tuple."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._to_numpy, fn, args, background)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking variant for setup code outside the event loop."""
        return self._pool.submit(self._eval, fn, args).result()

    @staticmethod
    def _eval(fn: Callable[..., T], args: tuple) -> T:
        out = fn(*args)
        mx.eval(out)
        return out

    @staticmethod
    def _to_numpy(fn: Callable[..., Any], args: tuple, background: Callable | None) -> Any:
        first, *rest = fn(*args)
        mx.eval(first, *rest)
        out = (np.array(first), *rest)
        if background is not None:
            later = background()
            if later is not None:
                mx.async_eval(later)
            out = (*out, later)
        return out

    def close(self) -> None:
        """Destroy this thread's MLX streams before it exits (else MLX aborts at exit)."""
        try:
            self._pool.submit(lambda: (mx.synchronize(), mx.clear_streams())).result()
        except RuntimeError:
            pass  # already shut down
        self._pool.shutdown(wait=True, cancel_futures=True)
