"""task=convert: the offline real-weights fixture (SmolLM2-135M-Instruct → qwen2_moe)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flashmoe.errors import ConfigError
from flashmoe.checkpoints.convert.smollm2 import convert_smollm2


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    t = cfg.task
    if not t.out:
        raise ConfigError("task.out is unset: task=convert needs task.out=DIR for the checkpoint")
    out = Path(t.out).expanduser()
    log.info("convert_started", source=t.source, variant=t.variant, experts=t.experts, out=str(out))
    convert_smollm2(out, experts=t.experts, variant=t.variant, log=log,
                    hint="choose another folder with task.out=DIR")
    return {"status": "ok", "hardware": cfg.hardware.name, "io_split": cfg.io.split,
            "io_threads": cfg.io.threads, "experts_per_token": None, "out": str(out),
            "variant": t.variant, "experts": t.experts}
