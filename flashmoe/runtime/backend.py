"""Which MLX build is installed (Metal, CUDA or CPU), what device a run will use, and how to get
the GPU build when a GPU profile meets a CPU-only install.

    python -m flashmoe.runtime.backend      # one line: what `make` installed (Makefile)
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass

# the package that ships libmlx for each backend (mlx's own extras: mlx[cpu], mlx[cuda13], ...)
PACKAGES = {"mlx-cuda-13": "cuda", "mlx-cuda-12": "cuda", "mlx-metal": "metal", "mlx-cpu": "cpu"}
MLX_PIN = "0.32.4"  # pyproject.toml pins the same version


@dataclass(frozen=True, slots=True)
class Backend:
    """The installed MLX build: `name` is metal / cuda / cpu; `gpu` whether it can use one."""
    name: str
    package: str
    mlx_version: str
    gpu: bool
    gpu_name: str | None
    cpu_name: str

    def line(self, device: str) -> str:
        """`MLX 0.32.4 cuda (mlx-cuda-13), device gpu: NVIDIA H200` for a run on `device`."""
        where = self.gpu_name if device == "gpu" else self.cpu_name
        return (f"MLX {self.mlx_version} {self.name} backend ({self.package}), device {device}"
                + (f": {where}" if where else ""))

    def summary(self) -> dict[str, str | None]:
        """run_summary keys (README "Log keys")."""
        return {"mlx_version": self.mlx_version, "mlx_backend": self.name,
                "mlx_package": self.package, "gpu_name": self.gpu_name}


def detect() -> Backend:
    import mlx.core as mx

    gpu = bool(mx.is_available(mx.gpu))
    package = next((p for p in PACKAGES if _installed(p)), "mlx")
    name = "cuda" if gpu and mx.cuda.is_available() else "metal" if gpu else "cpu"
    return Backend(name=name, package=package, mlx_version=mx.__version__, gpu=gpu,
                   gpu_name=_device_name(mx, mx.gpu) if gpu else None,
                   cpu_name=_device_name(mx, mx.cpu) or platform.processor())


def nvidia_gpu_visible() -> bool:
    """`nvidia-smi -L` succeeds: an NVIDIA driver and GPU this build could have used."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def gpu_install_hint(backend: Backend, profile: str) -> str:
    """What to run to get the GPU build, for a run that asked for the GPU and got the CPU."""
    if platform.system() == "Darwin":
        return (f"hardware={profile} wants the GPU but this MLX build ({backend.package}) has "
                f"no Metal backend; reinstall it: {sys.executable} -m pip install --force-reinstall "
                f"mlx=={MLX_PIN}")
    pip = f"{sys.executable} -m pip"
    install = (f"{pip} uninstall -y {backend.package} && {pip} install \"mlx[cuda13]=={MLX_PIN}\"")
    seen = ("an NVIDIA GPU is visible (nvidia-smi)" if nvidia_gpu_visible()
            else "no NVIDIA GPU is visible here (nvidia-smi fails), so check the driver first")
    return (f"hardware={profile} wants the GPU but this MLX build ({backend.package}) is CPU-only "
            f"and {seen}; running on the CPU in float32. For the CUDA build: `{install}` "
            "(in a checkout: `make run BACKEND=cuda`; CUDA 13 needs NVIDIA driver >= 580, "
            "mlx[cuda12] older ones)")


def _installed(package: str) -> bool:
    try:
        md.version(package)
        return True
    except md.PackageNotFoundError:
        return False


def _device_name(mx: object, device: object) -> str | None:
    try:
        return str(mx.device_info(device).get("device_name") or "") or None  # type: ignore[attr-defined]
    except Exception:  # older MLX or a backend without device_info: the name is optional
        return None


if __name__ == "__main__":
    b = detect()
    print(f"MLX {b.mlx_version} {b.name} backend from {b.package}"
          + (f", GPU {b.gpu_name}" if b.gpu_name else f", CPU {b.cpu_name}"))
