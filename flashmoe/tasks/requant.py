"""task=requant: a copy of the checkpoint with its routed experts re-quantized."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flashmoe.tasks.common import checkpoint_path
from flashmoe.checkpoints.requant import requant


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    src = checkpoint_path(cfg)
    t = cfg.task
    dst = Path(t.out).expanduser() if t.out else src.with_name(f"{src.name}-{t.bits}bit")
    layer_bits = {int(k): int(v) for k, v in OmegaConf.to_container(t.layer_bits).items()}
    log.info("requant_started", source=str(src), out=str(dst), bits=t.bits,
             group_size=t.group_size, layer_bits=layer_bits)
    requant(src, dst, bits=t.bits, group_size=t.group_size, layer_bits=layer_bits, log=log,
            hint="choose another folder with task.out=DIR")
    return {"status": "ok", "hardware": cfg.hardware.name, "io_split": cfg.io.split,
            "io_threads": cfg.io.threads, "experts_per_token": None, "out": str(dst),
            "bits": t.bits, "group_size": t.group_size}
