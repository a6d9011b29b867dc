"""Expert parallelism on mx.distributed: which experts a rank owns, the one all_sum per MoE
layer, and bounded waits, so a dead or silent peer ends the run instead of hanging it.

    par = ExpertParallel.detect("expert", "any", timeout_s=120, connect_s=60)
    # None in one process; else rank r of N owns share(E) of every MoE layer's experts

Share: contiguous blocks, rank r of N owns experts [r*E//N, (r+1)*E//N) of every layer (in
the packed layout a rank's experts are one contiguous range of each layer's blob).
Exactness: the ranks sum the per-pair expert outputs y [B*L*k, D] (each pair computed by
exactly one rank, zeros elsewhere: x + 0.0 is exact) and every rank then combines them as
one process does. Summing already-weighted partial sums would change the float order.
No transport of our own: MLX's ring (TCP), MPI, NCCL or JACCL backends, via mlx.launch.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import mlx.core as mx
import numpy as np

from flashmoe.errors import FlashMoeError

BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")
STRATEGIES = ("expert", "none")
# set by mlx.launch (ring/jaccl/nccl: MLX_RANK; nccl: MLX_WORLD_SIZE) or mpirun
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
              "OMPI_COMM_WORLD_SIZE")


class DistError(FlashMoeError):
    """A rank died, cannot be reached, stays silent, or disagrees with the others.

    A silent peer leaves this process's MLX thread blocked in the collective: the app ends
    the process (os._exit) after writing its summary instead of joining that thread."""


def launched() -> bool:
    """Whether a launcher started this process as one rank of several."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


def env_rank() -> str:
    """This process's rank as the launcher set it (before init can say)."""
    return os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"


@dataclass(frozen=True, slots=True)
class ExpertParallel:
    """Rank `rank` of `size`: its expert share, collectives with bounded waits."""

    group: Any  # mx.distributed.Group
    rank: int
    size: int
    backend: str
    timeout_s: float  # longest wait for the other ranks in one collective

    @classmethod
    def detect(cls, strategy: str, backend: str, timeout_s: float,
               connect_s: float) -> "ExpertParallel | None":
        """The world this process was launched into, or None for one process."""
        if strategy == "none" or not launched():
            return None
        group = _bounded_init(backend, connect_s)
        if group.size() == 1:
            return None
        return cls(group, group.rank(), group.size(), backend, timeout_s)

    def share(self, num_experts: int) -> range:
        """The experts of every MoE layer this rank owns (a contiguous block)."""
        return range(self.rank * num_experts // self.size,
                     (self.rank + 1) * num_experts // self.size)

    def peers(self) -> str:
        """Who this rank waits on, for error messages."""
        others = [r for r in range(self.size) if r != self.rank]
        return f"rank {others[0]}" if len(others) == 1 else \
            "one of ranks " + ", ".join(map(str, others))

    async def all_sum(self, run: Any, y: Callable[[], mx.array], what: str) -> mx.array:
        """y() summed over the ranks; `run` is the MLX worker's run (builds and evaluates in
        its thread)."""
        return await self.bounded(run(lambda: mx.distributed.all_sum(y(), group=self.group)),
                                  what, self.timeout_s)

    async def all_gather(self, run: Any, values: np.ndarray, what: str,
                         timeout_s: float | None = None) -> np.ndarray:
        """[N, *values.shape]: every rank's values, rank order."""
        out = await self.bounded(run(lambda: mx.distributed.all_gather(
            mx.array(values[None]), group=self.group)), what, timeout_s or self.timeout_s)
        return np.array(out)

    async def bounded(self, work: Awaitable[Any], what: str, timeout_s: float) -> Any:
        """Await a collective; a lost peer or no answer within timeout_s is a DistError."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            raise DistError(
                f"rank {self.rank}: no answer from {self.peers()} for {timeout_s:g}s in "
                f"{what}; that rank is stuck, paused or far slower (dist.timeout_s="
                f"{timeout_s:g}); the run is ended on every rank") from None
        except RuntimeError as e:
            if "[ring]" not in str(e) and "peer" not in str(e) and "nccl" not in str(e).lower():
                raise
            raise DistError(
                f"rank {self.rank}: lost the connection to {self.peers()} in {what} ({e}); "
                "that rank died, was killed or its machine went away; the run is ended on "
                "every rank") from None

    async def agree(self, run: Any, digests: Sequence[tuple[str, bytes]]) -> None:
        """Refuse to start unless every rank has the same digests (checkpoint, config)."""
        mine = np.frombuffer(b"".join(d for _, d in digests), dtype=np.uint8)
        got = await self.all_gather(run, mine, "the start-up check")
        off = 0
        for name, d in digests:
            for r in range(self.size):
                if bytes(got[r, off:off + len(d)]) != d:
                    raise DistError(
                        f"rank {self.rank}: rank {r} runs a different {name} than this rank "
                        f"(digest {bytes(got[r, off:off + 4]).hex()} vs {d[:4].hex()}); every "
                        "rank must open the same checkpoint with the same settings")
            off += len(d)


def digest(*parts: Any) -> bytes:
    """A short stable hash of JSON-able parts (config, tensor headers, options)."""
    import json

    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).digest()[:16]


def _bounded_init(backend: str, connect_s: float) -> Any:
    """mx.distributed.init waits forever for a peer that never starts, holding the GIL (no
    thread or signal handler of ours runs meanwhile): a watchdog process prints the line
    and ends this one (SIGKILL, exit 137) unless init returns in time."""
    msg = (f"flashmoe: rank {env_rank()}: could not connect to the other ranks within "
           f"{connect_s:g}s (backend {backend}); a rank did not start or cannot be reached: "
           "start every rank (mlx.launch does), check the hosts and ports, or raise "
           "dist.connect_timeout_s")
    sys.stderr.flush()
    watchdog = subprocess.Popen(
        ["/bin/sh", "-c", f'sleep {connect_s} 2>/dev/null; printf "%s\\n" "$1" >&2; '
         f'kill -KILL {os.getpid()}', "watchdog", msg],  # sleep holds no pipe of ours
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistError(f"rank {env_rank()}: mx.distributed.init(backend={backend}) failed "
                        f"after {time.perf_counter() - t0:.1f}s ({e}); check the launcher's "
                        "hostfile and that this MLX build has that backend") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)  # the shell and its sleep
        watchdog.wait()
