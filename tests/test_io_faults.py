"""I/O faults, long runs and interruptions: never a token from partial bytes, always a summary.

Faults are injected through the I/O layer (EngineOptions.reader, os.preadv's signature) or by
truncating a checkpoint copy under an open engine. RELIABILITY.md lists every row.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import error_lines
from flashmoe.engine import Engine, EngineOptions
from flashmoe.errors import ConfigError, ExpertReadError
from flashmoe.runtime.io_pool import IOPool, ReadJob

PROMPT = [5, 99, 310, 42, 7]
STEPS = 8


@dataclass
class FaultyReader:
    """os.preadv that can cap each read and raise `err` on the calls `fail(n)` picks."""

    cap: int | None = None  # at most this many bytes per call: short reads
    err: int = errno.EIO
    fail: object = lambda n: False  # call number (1-based) -> raise?
    calls: int = 0
    first_fault: int | None = None  # call number of the first raised error
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, fd: int, bufs: list, offset: int) -> int:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.fail(n):
            self.first_fault = self.first_fault or n
            raise OSError(self.err, os.strerror(self.err))
        buf = bufs[0] if self.cap is None else bufs[0][:self.cap]
        return os.preadv(fd, [buf], offset)


@dataclass
class Outcome:
    tokens: list[int]
    faulted_before: list[bool]  # per token: had a read already failed when it was yielded?
    reads_before: list[int]  # per token: reads done when it was yielded
    error: Exception | None


async def generate(path: Path, reader: FaultyReader | None = None, **opts) -> Outcome:
    """Tokens until the end or the first error."""
    engine = await Engine.open(path, EngineOptions(reader=reader, **opts), tokenizer=False)
    out = Outcome([], [], [], None)
    try:
        async for ev in engine.generate(PROMPT, STEPS):
            out.tokens.append(ev.token_id)
            out.faulted_before.append(reader is not None and reader.first_fault is not None)
            out.reads_before.append(reader.calls if reader is not None else 0)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        out.error = e
    finally:
        await engine.aclose()
    return out


@dataclass(frozen=True)
class Clean:
    path: Path  # tiny mixtral
    tokens: list[int]  # its greedy tokens, no faults
    reads_mid: int  # reads done when the middle token came out
    reads: int  # reads in all


@pytest.fixture(scope="module")
def clean(tiny) -> Clean:
    import asyncio

    path = tiny("mixtral")
    counter = FaultyReader()
    out = asyncio.run(generate(path, counter))
    assert out.error is None and len(out.tokens) == STEPS
    assert out.reads_before[STEPS // 2] < counter.calls  # decode steps read experts too
    return Clean(path, out.tokens, out.reads_before[STEPS // 2], counter.calls)


@pytest.mark.parametrize("split", [1, 3])
async def test_short_reads_are_completed(clean, split):
    reader = FaultyReader(cap=1000)
    out = await generate(clean.path, reader, io_split=split)
    assert out.error is None and out.tokens == clean.tokens
    assert reader.calls > clean.reads  # reads really came back short and were continued


@pytest.mark.parametrize("code", [errno.EIO, errno.EINTR, errno.EAGAIN])
async def test_transient_errors_are_retried(clean, code):
    retried, mid = [], clean.reads_mid
    reader = FaultyReader(err=code, fail=lambda n: n in (mid + 1, mid + 2))
    out = await generate(clean.path, reader, io_retries=3,
                         on_io_retry=lambda **kw: retried.append(kw))
    assert out.error is None and out.tokens == clean.tokens and any(out.faulted_before)
    assert [r["errno"] for r in retried] == [code, code]


async def test_persistent_eio_ends_run_without_tokens_after_fault(clean):
    reader = FaultyReader(fail=lambda n: n > clean.reads_mid)
    out = await generate(clean.path, reader, io_retries=3)
    assert isinstance(out.error, ExpertReadError)
    assert "Input/output error after 4 attempt(s) (3 retries allowed)" in str(out.error)
    assert "no token was computed from partial bytes" in str(out.error)
    assert 0 < len(out.tokens) < STEPS and out.tokens == clean.tokens[:len(out.tokens)]
    assert not any(out.faulted_before)  # the token being computed at the fault never came out


async def test_non_retryable_error_fails_at_once(clean):
    reader = FaultyReader(err=errno.EBADF, fail=lambda n: n == 3)
    out = await generate(clean.path, reader, io_retries=3)
    assert isinstance(out.error, ExpertReadError) and "after 1 attempt(s)" in str(out.error)
    assert out.tokens == []


def copy_and_truncate_later(src: Path, dst: Path) -> tuple[Path, int]:
    """A copy of src, and where its only shard's header ends (truncating there keeps it openable
    only for an engine that opened it before)."""
    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    return shard, 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]


async def test_truncated_after_open_hits_eof(clean, tmp_path):
    shard, end = copy_and_truncate_later(clean.path, tmp_path / "ckpt")
    engine = await Engine.open(tmp_path / "ckpt", EngineOptions(), tokenizer=False)
    os.truncate(shard, end)
    toks = []
    with pytest.raises(ExpertReadError, match="truncated after it was opened"):
        async for ev in engine.generate(PROMPT, STEPS):
            toks.append(ev.token_id)
    await engine.aclose()
    assert toks == []


@pytest.mark.parametrize("option,value,words", [
    ("io_threads", 0, "io.threads=0 must be between 1"),
    ("io_split", 65, "io.split=65 must be between 1 and 64"),
    ("io_retries", -1, "io.retries=-1 must be between 0")])
async def test_engine_options_out_of_range_refused(clean, option, value, words):
    """The Python API gets the CLI's words for the same mistake."""
    with pytest.raises(ConfigError, match=words):
        await Engine.open(clean.path, EngineOptions(**{option: value}), tokenizer=False)


def test_iopool_rejects_a_reader_returning_nonsense(tmp_path):
    file = tmp_path / "f"
    file.write_bytes(bytes(range(256)) * 64)
    fd = os.open(file, os.O_RDONLY)
    try:
        dest = np.zeros(8192, dtype=np.uint8)
        job = ReadJob(fd, 0, dest, "test range")
        assert IOPool(2, 2).read_blocking([job]) == 8192 and dest[255] == 255
        for bad in (-1, 10**6):
            with pytest.raises(ExpertReadError, match=f"returned {bad}"):
                IOPool(1, 1, reader=lambda fd, bufs, off, bad=bad: bad).read_blocking([job])
    finally:
        os.close(fd)


# ---- the task runner: status=error and one line ----------------------------------------------
def run_app(path: Path, run_dir: Path, monkeypatch, opened=lambda engine: None, **options) -> int:
    """app.main on a composed config; `options` go to EngineOptions, `opened(engine)` runs
    right after the engine opens."""
    import flashmoe.tasks.generate as gen
    from flashmoe.app import main
    from flashmoe.config import compose_config

    real = gen.open_engine

    async def open_engine(cfg, **extra):
        engine = await real(cfg, **extra, **options)
        try:
            opened(engine)
        except BaseException:
            await engine.aclose()  # as common.open_engine does: no MLX thread outlives a failure
            raise
        return engine

    monkeypatch.setattr(gen, "open_engine", open_engine)
    cfg = compose_config([f"model.path={path}", "hardware=linux_cpu", f"max_tokens={STEPS}",
                          f"run_dir={run_dir}"])
    return main(cfg)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "flashmoe.jsonl").read_text().splitlines()]


def test_app_truncated_after_open_status_error(clean, tmp_path, monkeypatch, capsys):
    shard, end = copy_and_truncate_later(clean.path, tmp_path / "ckpt")
    code = run_app(tmp_path / "ckpt", tmp_path / "run", monkeypatch,
                   lambda engine: os.truncate(shard, end))
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("flashmoe: reading layer "), lines
    (summary,) = [e for e in events(tmp_path / "run") if e["event"] == "run_summary"]
    assert summary["status"] == "error"


def test_app_persistent_eio_status_error_and_retries_logged(clean, tmp_path, monkeypatch, capsys):
    reader = FaultyReader(fail=lambda n: n > 2)  # the prompt's reads fail: no token at all
    code = run_app(clean.path, tmp_path / "run", monkeypatch, reader=reader)
    out, err = capsys.readouterr()
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Input/output error" in lines[0], lines
    evs = events(tmp_path / "run")
    retried = [e for e in evs if e["event"] == "expert_read_retried"]
    assert retried and all(e["errno"] == errno.EIO for e in retried)
    assert not [e for e in evs if e["event"] == "token_sampled"] and out == ""
    assert [e for e in evs if e["event"] == "run_summary"][0]["status"] == "error"


# ---- long and interrupted runs ---------------------------------------------------------------
@pytest.mark.slow
async def test_memory_grows_only_with_the_kv_cache(tiny):
    """1,000 tokens: RSS at 100 vs 1,000 tokens grows by the KV cache and little else.

    A first 1,000-token pass warms the allocators (MLX's buffer cache, malloc): they have then
    seen every size the KV cache grows through, so the measured pass shows what a leak would
    add per token rather than allocator warm-up.
    """
    import gc

    import mlx.core as mx
    import psutil

    path = tiny("mixtral")
    cfg = json.loads((path / "config.json").read_text())
    kv_per_token = (cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * 4
                    * cfg["hidden_size"] // cfg["num_attention_heads"])  # f32 K and V
    engine = await Engine.open(path, EngineOptions(), tokenizer=False)
    rss, active, n = {}, {}, 0
    try:
        async for _ in engine.generate(PROMPT, 1000):
            pass
        async for _ in engine.generate(PROMPT, 1000):
            n += 1
            if n in (100, 1000):
                gc.collect()
                rss[n], active[n] = psutil.Process().memory_info().rss, mx.get_active_memory()
    finally:
        await engine.aclose()
    assert n == 1000
    slope = (rss[1000] - rss[100]) / 900
    assert slope < kv_per_token + 1024, f"RSS grows {slope:.0f} B/token; KV is {kv_per_token}"
    assert active[1000] - active[100] <= kv_per_token * (900 + 256)  # the KV cache's own steps


def test_sigterm_stops_cleanly_with_summary(tiny, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "flashmoe", f"model.path={tiny('mixtral')}",
                             "hardware=linux_cpu", "max_tokens=4000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, logs = time.time() + 60, []
    while time.time() < deadline and proc.poll() is None:
        logs = list(tmp_path.rglob("flashmoe.jsonl"))
        if logs and "token_sampled" in logs[0].read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "flashmoe: interrupted; summary written" in lines
    assert lines[-1].startswith("flashmoe: status=interrupted")
    (summary,) = [e for e in events(logs[0].parent) if e["event"] == "run_summary"]
    assert summary["status"] == "interrupted" and summary["generated_tokens"] >= 1


def test_unexpected_error_is_one_line_and_logged(tiny, tmp_path, monkeypatch, capsys):
    """A bug of ours (any non-flashmoe exception) still ends in one line and status=error."""
    def broken(engine):
        raise RuntimeError("simulated bug")

    code = run_app(tiny("qwen3_5_moe"), tmp_path / "run", monkeypatch, opened=broken)
    err = error_lines("\n".join(l for l in capsys.readouterr().err.splitlines()
                                 if not l.startswith("[INFO]")))  # the fixture build's note
    assert code != 0
    assert len(err) == 1 and err[0].startswith("flashmoe: internal error (RuntimeError: simulated")
    evs = events(tmp_path / "run")
    assert [e["status"] for e in evs if e["event"] == "run_summary"] == ["error"]
    assert any(e["event"] == "run_failed" and "exception" in e for e in evs)  # the traceback
