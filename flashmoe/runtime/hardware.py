"""Pick the hardware profile for `hardware=auto` (the default) and fill it in at run time."""
from __future__ import annotations

import copy
import platform
from typing import Optional

from omegaconf import DictConfig, OmegaConf, read_write

from flashmoe.conf_dir import available_options, conf_dir
from flashmoe.config import HardwareConfig
from flashmoe.errors import ConfigError
from flashmoe.runtime.memory import total_memory_gb


def cuda_available() -> bool:
    """Whether this MLX build can run on an NVIDIA GPU (mlx-cuda); False without MLX."""
    try:
        import mlx.core as mx

        return bool(mx.cuda.is_available())
    except Exception:  # no mlx, or a build without the cuda module: not a GPU machine
        return False


def detect_profile(
    *,
    system: Optional[str] = None,
    machine: Optional[str] = None,
    memory_gb: Optional[float] = None,
    cuda: Optional[bool] = None,
) -> str:
    """Name of the hardware profile that fits this machine; arguments override detection (tests).

    Apple silicon by unified memory: <=32 GB m4pro, <=64 GB m3max, else m5max. Linux with
    mlx-cuda: h200. Anything else: linux_cpu (the CPU backend).
    """
    system = system if system is not None else platform.system()
    machine = machine if machine is not None else platform.machine()
    if system == "Darwin" and machine == "arm64":
        memory = memory_gb if memory_gb is not None else total_memory_gb()
        if memory <= 32:
            return "m4pro"
        return "m3max" if memory <= 64 else "m5max"
    if system == "Linux" and (cuda if cuda is not None else cuda_available()):
        return "h200"
    return "linux_cpu"


def load_profile(name: str) -> DictConfig:
    """A hardware profile's values, read from its YAML in the package and type-checked."""
    path = conf_dir() / "hardware" / f"{name}.yaml"
    if name == "auto" or not path.is_file():
        options = ", ".join(o for o in available_options("hardware") if o != "auto")
        raise ConfigError(f"hardware={name} is not a concrete hardware profile; available: {options}")
    with path.open(encoding="utf-8") as f:
        values = OmegaConf.load(f)
    values.pop("defaults", None)  # Hydra's composition list, not a value
    return OmegaConf.merge(OmegaConf.structured(HardwareConfig), values)


def resolve_hardware(cfg: DictConfig, *, profile: Optional[str] = None) -> DictConfig:
    """Replace `hardware=auto` by the detected (or given) profile; other profiles pass through.

    Keys the user overrode (`hardware.io_threads=8`) are no longer ??? in the auto group and are
    kept. Returns a copy; io.* and cache.* follow through their ${hardware.*} interpolations.
    """
    if cfg.hardware.name != "auto":
        return cfg
    name = profile if profile is not None else detect_profile()
    chosen = load_profile(name)
    out = copy.deepcopy(cfg)
    with read_write(out):
        for key in chosen:
            if key != "name" and OmegaConf.is_missing(out.hardware, key):
                out.hardware[key] = chosen[key]
        out.hardware.name = name
    return out
