"""Memory accounting: resident set size now, at its peak, and over a window.

GB here is GiB (2**30 bytes), as the OS reports RAM and as `hardware.memory_gb` is written.
"""
from __future__ import annotations

import resource
import sys
import threading
from types import TracebackType
from typing import Optional

import psutil

from flashmoe.constants import GIB



def peak_rss_gb() -> float:
    """Peak resident set size of this process since it started.

    Linux: VmHWM, because ru_maxrss keeps the parent's peak across fork+exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB


def current_rss_gb() -> float:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss / GIB


def total_memory_gb() -> float:
    """Physical memory of the machine."""
    return psutil.virtual_memory().total / GIB


class RssSampler:
    """Samples RSS in a background thread; peak over the `with` block, unlike ru_maxrss.

    ru_maxrss is a high-water mark for the whole process, so it cannot show growth inside a
    window once an earlier phase peaked higher; sampling can.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.start_gb = 0.0
        self.peak_gb = 0.0
        self.end_gb = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def growth_gb(self) -> float:
        """Peak RSS in the window minus RSS at its start."""
        return self.peak_gb - self.start_gb

    def _rss_gb(self) -> float:
        return self._process.memory_info().rss / GIB

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_gb = max(self.peak_gb, self._rss_gb())

    def __enter__(self) -> "RssSampler":
        self.start_gb = self.peak_gb = self._rss_gb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.end_gb = self._rss_gb()
        self.peak_gb = max(self.peak_gb, self.end_gb)
