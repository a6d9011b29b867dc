"""Build a synthetic checkpoint once per parameter set and reuse it from the user cache.

A build happens in a hidden temporary directory and becomes visible with one `os.rename`,
so an interrupted build is never mistaken for a finished one (flashmoe/runtime/staging.py).
Concurrent builders of the same key serialise on a `flock`; whoever gets the lock second
finds the result and returns.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashmoe.errors import CheckpointError, ConfigError
from flashmoe.runtime.staging import staged

FORMAT_VERSION = 1  # bump when the writers change what they put on disk
MARKER = "flashmoe-synth.json"  # written last inside the temporary directory
ENV_DIR = "FLASHMOE_CACHE_DIR"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """`cache_dir`, else $FLASHMOE_CACHE_DIR, else platformdirs' user cache for flashmoe."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashmoe"))


def cache_key(kind: str, params: dict[str, Any]) -> str:
    """`kind-<12 hex>`: a hash of kind, params and FORMAT_VERSION."""
    try:
        blob = json.dumps({"kind": kind, "params": params, "format": FORMAT_VERSION},
                          sort_keys=True)
    except TypeError as exc:
        raise ConfigError(f"cache params for {kind!r} must be JSON values (str, number, bool, "
                          f"list, dict); got {params!r}: {exc}") from exc
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def cached_checkpoint(
    kind: str, params: dict[str, Any], builder: Callable[[Path], Any],
    *, cache_dir: Path | str | None = None, log: Any = None,
) -> Path:
    """The finished checkpoint for (kind, params), calling `builder(tmp_dir)` to fill an empty
    temp folder if absent (runtime/staging.py: orphans of killed builds are removed first)."""
    root = cache_root(cache_dir)
    key = cache_key(kind, params)
    final = root / key
    if is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{key}.lock", "w")
    except OSError as exc:
        raise CheckpointError(f"cannot create the synthetic checkpoint cache at {root}: {exc}. "
                              f"Set {ENV_DIR} to a writable directory.") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_complete(final):
            return final
        _remove_stale(root, key, final)
        hint = f"set {ENV_DIR} to a folder on a disk with more space"
        with staged(final, needed=None, hint=hint, log=log) as tmp:  # renamed to final at the end
            start = time.perf_counter()
            builder(tmp)
            record = {"kind": kind, "params": params, "format": FORMAT_VERSION,
                      "build_s": round(time.perf_counter() - start, 3)}
            (tmp / MARKER).write_text(json.dumps(record, indent=2))
    return final


def _remove_stale(root: Path, key: str, final: Path) -> None:
    """Leftovers of builds of `key` by older versions: safe to delete, since we hold its lock."""
    for stale in root.glob(f".{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # no marker: written by hand or by an older, non-atomic version
        shutil.rmtree(final, ignore_errors=True)
