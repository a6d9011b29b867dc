"""The install fits the machine: extras name the MLX builds, `make` picks one, a run says which.

No download: the extras are checked against pyproject.toml and the installed mlx's own metadata
(its extras cpu / cuda13 / cuda12 name the package that ships libmlx).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashmoe.runtime.backend import MLX_PIN, detect
from tests.conftest import START_LINE

packaging = pytest.importorskip("packaging.requirements")
tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LINUX = {"sys_platform": "linux", "platform_system": "Linux"}
DARWIN = {"sys_platform": "darwin", "platform_system": "Darwin"}
EXTRAS = {"cpu": ("cpu", "mlx-cpu"), "cuda": ("cuda13", "mlx-cuda-13"),
          "cuda12": ("cuda12", "mlx-cuda-12")}  # ours -> (mlx's extra, the libmlx package)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def applies(req: "packaging.Requirement", env: dict, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**env, "extra": extra})


def mlx_requirements(reqs: list[str], env: dict) -> list["packaging.Requirement"]:
    parsed = [packaging.Requirement(r) for r in reqs]
    return [r for r in parsed if r.name.startswith("mlx") and r.name != "mlx-lm"
            and applies(r, env)]


def mlx_extra_targets() -> dict[str, str]:
    """mlx's own metadata: extra -> the requirement it adds on Linux (e.g. mlx-cuda-13==0.32.4)."""
    out = {}
    for text in md.requires("mlx") or []:
        req = packaging.Requirement(text)
        for extra in ("cpu", "cuda13", "cuda12"):
            if req.marker and req.marker.evaluate({**LINUX, "extra": extra}) \
                    and not req.marker.evaluate({**LINUX, "extra": "none"}):
                out[extra] = f"{req.name}{req.specifier}"
    return out


def test_base_dependencies_force_no_linux_backend():
    for env in (LINUX, DARWIN):
        (req,) = mlx_requirements(project()["dependencies"], env)
        assert req.name == "mlx" and not req.extras and str(req.specifier) == f"=={MLX_PIN}"


def test_extras_resolve_to_the_pinned_mlx_builds():
    extras, targets = project()["optional-dependencies"], mlx_extra_targets()
    for ours, (theirs, package) in EXTRAS.items():
        (req,) = mlx_requirements(extras[ours], LINUX)
        assert req.extras == {theirs} and str(req.specifier) == f"=={MLX_PIN}", ours
        assert not mlx_requirements(extras[ours], DARWIN), ours  # macOS keeps plain mlx
        assert targets[theirs] == f"{package}=={MLX_PIN}", (ours, targets)
    (metal,) = mlx_requirements(extras["metal"], DARWIN)
    assert metal.name == "mlx" and not mlx_requirements(extras["metal"], LINUX)
    assert md.version("mlx") == MLX_PIN


def fake_nvidia_smi(folder: Path, cuda: str | None) -> dict:
    """A PATH whose nvidia-smi reports a GPU with driver CUDA `cuda`, or fails (None)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = "exit 9" if cuda is None else (
        f'[ "$1" = "-L" ] && {{ echo "GPU 0: NVIDIA H200"; exit 0; }}\n'
        f'echo "| NVIDIA-SMI 580.65  Driver Version: 580.65  CUDA Version: {cuda} |"')
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def make(*args: str, env: dict | None = None) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in (env or os.environ).items() if k != "BACKEND"}
    out = subprocess.run(["make", "-s", "-C", str(ROOT), *args], env=env, capture_output=True,
                         text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="the Linux rules")
@pytest.mark.parametrize("cuda,expected", [("13.0", "cuda: nvidia-smi sees an NVIDIA GPU"),
                                           ("12.4", "cuda12: nvidia-smi sees"),
                                           (None, "cpu: this is Linux and no NVIDIA GPU")])
def test_make_picks_the_backend(tmp_path, cuda, expected):
    assert make("backend", env=fake_nvidia_smi(tmp_path, cuda)).startswith(expected)


def test_make_backend_override_and_bad_value(tmp_path):
    env = fake_nvidia_smi(tmp_path, "13.0")
    assert make("backend", "BACKEND=cpu", env=env).startswith("cpu: BACKEND=cpu was given")
    assert "BACKEND=rocm is not one of: cpu cuda cuda12 metal" in make("backend", "BACKEND=rocm")


def test_venv_stamp_notices_a_backend_change(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    stamp = venv / ".installed-cpu"
    stamp.write_text("")
    later = time.time() + 5  # newer than pyproject.toml: nothing to do for the same backend
    os.utime(stamp, (later, later))
    same = make("-n", "run", f"VENV={venv}", "BACKEND=cpu")
    assert "pip install" not in same and "-m flashmoe" in same
    other = make("-n", "run", f"VENV={venv}", "BACKEND=cuda")
    assert "pip uninstall -q -y mlx-cpu mlx-cuda-12" in other
    assert '-e ".[test,cuda]"' in other and f"touch {venv}/.installed-cuda" in other


@pytest.mark.skipif(detect().gpu, reason="checks the CPU-only build's start line")
@pytest.mark.parametrize("profile", ["linux_cpu", "h200"])
def test_start_line_and_summary_name_backend_and_device(tiny, tmp_path, capsys, profile):
    from flashmoe.app import main
    from flashmoe.config import compose_config

    path = tiny("qwen3_5_moe")
    capsys.readouterr()  # the fixture build's mlx-lm note
    cfg = compose_config([f"model.path={path}", f"hardware={profile}", "max_tokens=2",
                          f"run_dir={tmp_path}"])
    assert main(cfg) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"{START_LINE}{MLX_PIN} cpu backend (mlx-cpu), device cpu"), first
    if profile == "h200":  # a GPU profile on the CPU build: the exact install command
        assert "wants the GPU" in first and "uninstall -y mlx-cpu" in first
        assert f'pip install "mlx[cuda13]=={MLX_PIN}"' in first and "BACKEND=cuda" in first
    events = [json.loads(x) for x in (tmp_path / "flashmoe.jsonl").read_text().splitlines()]
    (summary,) = [e for e in events if e["event"] == "run_summary"]
    assert summary["mlx_backend"] == "cpu" and summary["mlx_version"] == MLX_PIN
    assert summary["device"] == "cpu" and summary["mlx_package"] == "mlx-cpu"


def test_missing_backend_library_is_one_line(tmp_path):
    """Plain `mlx` on Linux without mlx-cpu / mlx-cuda: libmlx.so is missing."""
    fake = tmp_path / "mlx"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('libmlx.so: cannot open shared object file')")
    out = subprocess.run([sys.executable, "-m", "flashmoe"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, lines
    assert "libmlx.so" in lines[0] and f'pip install "mlx[cpu]=={MLX_PIN}"' in lines[0]
