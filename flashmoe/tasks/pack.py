"""task=pack: write the packed expert layout (one aligned blob per expert, with checksums)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from flashmoe.models.loader import load_resident
from flashmoe.checkpoints.packed import DIRNAME, align_up, write_packed
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.tasks.common import checkpoint_path


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    path = checkpoint_path(cfg)
    out = Path(cfg.task.out).expanduser() if cfg.task.out else path / DIRNAME
    index = CheckpointIndex.open(path)
    resident = load_resident(path, index, evaluate=False)  # layout only: nothing is read
    align = cfg.task.align_bytes
    total = sum(align_up(le.expert_nbytes, align) * le.num_experts
                for le in resident.experts.values())
    log.info("pack_started", source=str(path), out=str(out), total_bytes=total)
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        tid = bar.add_task("pack", total=total)
        write_packed(resident.experts, out, align, progress=lambda n: bar.advance(tid, n),
                     log=log)
    if out != path / DIRNAME:
        print(f"flashmoe: packed into {out}; move it to {path / DIRNAME} for io.layout=auto "
              "to use it", file=sys.stderr)
    return {"status": "ok", "hardware": cfg.hardware.name, "io_split": cfg.io.split,
            "io_threads": cfg.io.threads, "experts_per_token": None, "packed_dir": str(out),
            "packed_bytes": total, "layers": len(resident.experts)}
