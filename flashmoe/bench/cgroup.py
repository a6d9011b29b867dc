"""Run a process under a memory limit with a cgroup (v2 `memory.max` or v1
`memory.limit_in_bytes`; page cache counts in both). Needs root, as on the bench machines.

    python -m flashmoe.bench.cgroup 8 -- python -m flashmoe task=bench ...
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flashmoe.constants import GIB

V2 = Path("/sys/fs/cgroup")
V1 = Path("/sys/fs/cgroup/memory")


def make(name: str, limit_gb: float) -> tuple[Path | None, str]:
    """A fresh memory cgroup; (path, description) or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"none (memory cgroups are Linux-only; this is {sys.platform})"
    limit = str(int(limit_gb * GIB))
    try:
        if (V2 / "cgroup.controllers").is_file():
            cg = V2 / name
            cg.mkdir(exist_ok=True)
            (cg / "memory.max").write_text(limit)
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            return cg, f"cgroup v2 memory.max={limit_gb} GiB"
        if (V1 / "memory.limit_in_bytes").is_file():
            cg = V1 / name
            cg.mkdir(exist_ok=True)
            (cg / "memory.limit_in_bytes").write_text(limit)
            return cg, f"cgroup v1 memory.limit_in_bytes={limit_gb} GiB"
    except OSError as e:
        return None, f"none (cannot create a memory cgroup: {e.strerror})"
    return None, "none (no memory cgroup controller mounted)"


def join(cg: Path) -> None:
    """Move the calling process into `cg` (use as a preexec_fn)."""
    (cg / "cgroup.procs").write_text(str(os.getpid()))


def remove(cg: Path) -> None:
    try:
        cg.rmdir()
    except OSError:
        pass


def peak_gb(cg: Path) -> float | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        f = cg / name
        if f.is_file():
            return int(f.read_text().split()[0]) / GIB
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m flashmoe.bench.cgroup LIMIT_GB -- COMMAND ...", file=sys.stderr)
        return 2
    cg, how = make(f"flashmoe-run-{os.getpid()}", float(argv[0]))
    print(f"flashmoe.cgroup: limit {how}", file=sys.stderr)
    try:
        rc = subprocess.call(argv[2:], preexec_fn=(lambda: join(cg)) if cg else None)
        peak = peak_gb(cg) if cg else None
        if peak is not None:
            print(f"flashmoe.cgroup: peak memory (incl. page cache) {peak:.2f} GiB", file=sys.stderr)
        return rc
    finally:
        if cg:
            remove(cg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
