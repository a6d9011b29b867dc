"""`hardware=auto` (the default): look at the real machine, pick the closest profile and scale
its memory to what is there. Other profiles pass through unchanged."""
from __future__ import annotations

import copy
import platform
import subprocess
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf, read_write

from flashmoe.conf_dir import available_options, conf_dir
from flashmoe.config import HardwareConfig
from flashmoe.errors import ConfigError
from flashmoe.runtime.memory import total_memory_gb


@dataclass(frozen=True, slots=True)
class Machine:
    """What detection found: the OS, the chip, RAM and (on CUDA) the GPU and its memory."""

    system: str
    arch: str
    chip: str
    ram_gb: float
    gpu: Optional[str] = None
    gpu_memory_gb: Optional[float] = None

    @property
    def memory_gb(self) -> float:
        """Where the model and its expert cache live: GPU memory on CUDA, else (unified) RAM."""
        return self.gpu_memory_gb if self.gpu_memory_gb else self.ram_gb

    def describe(self) -> str:
        where = f"{self.gpu}, {self.gpu_memory_gb:.0f} GiB GPU memory, " if self.gpu else ""
        return f"{self.chip} ({where}{self.ram_gb:.0f} GiB RAM)"


def cuda_available() -> bool:
    """Whether this MLX build can run on an NVIDIA GPU (mlx-cuda); False without MLX."""
    try:
        import mlx.core as mx

        return bool(mx.cuda.is_available())
    except Exception:  # no mlx, or a build without the cuda module: not a GPU machine
        return False


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _cuda_gpu() -> tuple[Optional[str], Optional[float]]:
    """The first GPU's name and memory (GiB), from nvidia-smi."""
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    if not out.strip():
        return "NVIDIA GPU", None
    name, _, mib = out.splitlines()[0].rpartition(",")
    return name.strip(), float(mib) / 1024


def detect_machine() -> Machine:
    system, arch = platform.system(), platform.machine()
    chip = platform.processor() or arch
    if system == "Darwin":
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or chip
    elif system == "Linux":
        names = [ln.partition(":")[2].strip() for ln in _read("/proc/cpuinfo").splitlines()
                 if ln.startswith("model name")]
        chip = names[0] if names else chip
    gpu, gpu_gb = _cuda_gpu() if system == "Linux" and cuda_available() else (None, None)
    return Machine(system, arch, chip, total_memory_gb(), gpu, gpu_gb)


def detect_profile(
    *,
    system: Optional[str] = None,
    machine: Optional[str] = None,
    memory_gb: Optional[float] = None,
    cuda: Optional[bool] = None,
    chip: str = "",
) -> str:
    """Name of the hardware profile closest to this machine; arguments override detection.

    Apple silicon by chip name (M3 Max, M4 Pro, M5 Max), else by unified memory: <=32 GB
    m4pro, <=64 GB m3max, else m5max. Linux with mlx-cuda: h200. Anything else: linux_cpu.
    """
    system = system if system is not None else platform.system()
    machine = machine if machine is not None else platform.machine()
    if system == "Darwin" and machine == "arm64":
        for name in ("m3max", "m4pro", "m5max"):
            if name[:2] in chip.lower() and name[2:] in chip.lower().replace(" ", ""):
                return name
        memory = memory_gb if memory_gb is not None else total_memory_gb()
        if memory <= 32:
            return "m4pro"
        return "m3max" if memory <= 64 else "m5max"
    if system == "Linux" and (cuda if cuda is not None else cuda_available()):
        return "h200"
    return "linux_cpu"


def load_profile(name: str) -> DictConfig:
    """A hardware profile's values, read from its YAML and type-checked."""
    path = conf_dir() / "hardware" / f"{name}.yaml"
    if name == "auto" or not path.is_file():
        options = ", ".join(o for o in available_options("hardware") if o != "auto")
        raise ConfigError(f"hardware={name} is not a concrete hardware profile; available: {options}")
    values = OmegaConf.load(path)
    values.pop("defaults", None)  # Hydra's composition list, not a value
    return OmegaConf.merge(OmegaConf.structured(HardwareConfig), values)


def scaled(profile: DictConfig, memory_gb: float) -> dict:
    """memory_gb becomes the machine's; the cache budget keeps the profile's share of it."""
    share = profile.cache_budget_gb / profile.memory_gb
    return {"memory_gb": round(memory_gb, 1), "cache_budget_gb": round(memory_gb * share, 1)}


def resolve_hardware(cfg: DictConfig, *, profile: Optional[str] = None,
                     machine: Optional[Machine] = None) -> DictConfig:
    """Replace `hardware=auto` by the profile closest to the machine, scaled to its memory
    (`profile=` names one and skips scaling, for tests). Keys the user overrode are kept.
    Returns a copy; io.* and cache.* follow through their ${hardware.*} interpolations."""
    if cfg.hardware.name != "auto":
        return cfg
    values: dict = {}
    if profile is None:
        machine = machine or detect_machine()
        profile = detect_profile(system=machine.system, machine=machine.arch,
                                 memory_gb=machine.ram_gb, cuda=machine.gpu is not None,
                                 chip=machine.chip)
        user_memory = None if OmegaConf.is_missing(cfg.hardware, "memory_gb") else cfg.hardware.memory_gb
        values = scaled(load_profile(profile), user_memory or machine.memory_gb)
    chosen = OmegaConf.merge(load_profile(profile), values)
    out = copy.deepcopy(cfg)
    with read_write(out):
        for key in chosen:
            if key != "name" and OmegaConf.is_missing(out.hardware, key):
                out.hardware[key] = chosen[key]
        out.hardware.name = profile
    return out


def picked_line(cfg: DictConfig, machine: Machine) -> str:
    """What `hardware=auto` picked, for stderr and the log."""
    h = cfg.hardware
    return (f"hardware=auto picked {h.name} for {machine.describe()}: memory_gb={h.memory_gb} "
            f"cache_budget_gb={h.cache_budget_gb} io.threads={h.io_threads} "
            f"io.split={h.io_split} io.direct={str(cfg.io.direct).lower()} device={h.device} "
            f"dtype={h.dtype}")
