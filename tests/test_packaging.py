"""The wheel ships every package and conf/ (pyproject lists them; discovery cannot map conf/)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_names_every_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "flashmoe").rglob("__init__.py")}
    assert listed == found | {"flashmoe.conf"}


@pytest.mark.slow
def test_wheel_holds_conf_and_runs_from_elsewhere(tmp_path: Path) -> None:
    """Build the wheel, unpack it alone on sys.path, compose the config from another cwd."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("flashmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flashmoe/conf/config.yaml" in names and "flashmoe/conf/hardware/h200.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "flashmoe", "--cfg", "job", "task=bench"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert "name: bench" in out.stdout
    code = "import flashmoe.conf_dir as c; print(c.conf_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "flashmoe" / "conf")
    every = ("import importlib, pkgutil, flashmoe\n"
             "for m in pkgutil.walk_packages(flashmoe.__path__, 'flashmoe.'):\n"
             "    if not m.name.endswith('__main__'): importlib.import_module(m.name)")
    subprocess.run([sys.executable, "-c", every], cwd=tmp_path, env=env, check=True)
