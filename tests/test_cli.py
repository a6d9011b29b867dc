"""`python -m flashmoe` as a person runs it: stdout is the text, logs hold the contract."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import error_lines

TOKEN_KEYS = {"token_id", "position", "device_trip_ms", "route_host_ms", "expert_fetch_ms",
              "expert_compute_ms", "sampling_ms", "bytes_read", "experts_fetched"}
SUMMARY_KEYS = {"tok_s", "ttft_s", "expert_io_ms_per_token", "expert_gb_per_token", "peak_rss_gb",
                "io_split", "io_threads", "hardware", "experts_per_token", "status"}


def flashmoe(cwd: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashmoe", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "flashmoe.jsonl").read_text().splitlines()]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("flashmoe.jsonl"))


def check_run(run_dir: Path, split: int) -> list[int]:
    evs = events(run_dir)
    toks = [e for e in evs if e["event"] == "token_sampled"]
    assert toks and all(TOKEN_KEYS <= e.keys() for e in toks)
    (summary,) = [e for e in evs if e["event"] == "run_summary"]
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "ok" and summary["io_split"] == split and summary["tok_s"] > 0
    return [e["token_id"] for e in toks]


def test_single_run_streams_only_text(tiny, tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = tiny("qwen3_5_moe")
    out = flashmoe(tmp_path, f"model.path={path}", "hardware=m5max", "io.split=4",
                   "max_tokens=12", "prompt=The sea")
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp_path / "runs")
    ids = check_run(run, 4)
    tok = load_tokenizer(path)
    text = tok.decode([i for i in ids if i not in tok.eos_token_ids])
    assert out.stdout == text + "\n"  # the generated text and nothing else
    assert "status=ok" in out.stderr and "tok/s" in out.stderr


def test_multirun_writes_one_run_dir_per_value(tiny, tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = tiny("qwen3_5_moe")
    out = flashmoe(tmp_path, "-m", f"model.path={path}", "hardware=linux_cpu", "io.split=1,2",
                   "max_tokens=6", "prompt=Hello, world")  # the split sweeps, not the prompt
    assert out.returncode == 0, out.stderr
    runs = run_dirs(tmp_path / "runs" / "multirun")
    assert [r.name for r in runs] == ["0", "1"]
    assert check_run(runs[0], 1) == check_run(runs[1], 2)  # same greedy tokens either way
    hello = load_tokenizer(path).encode("Hello, world")
    for run in runs:
        (started,) = [e for e in events(run) if e["event"] == "generation_started"]
        assert started["prompt_token_ids"] == hello


@pytest.mark.parametrize("args,needle", [
    (["io.split=0"], "io.split=0 must be between 1 and 64"),
    (["hardware=nope"], "available: auto, h200, linux_cpu, m3max, m4pro, m5max"),
    (["model.path=/missing/ckpt"], "model.path=/missing/ckpt does not exist"),
    (["io.split=abc"], "io.split=abc"),
    (["task=nope"], "task=nope is not an option of task"),
    (["-m", "io.split=1,0"], "io.split=0 must be between 1 and 64"),
])
def test_bad_values_one_line_no_traceback(tmp_path, args, needle):
    out = flashmoe(tmp_path, *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("flashmoe: ") and needle in lines[0], lines
    assert out.stdout == ""


def _interrupt_once(path: Path, cwd: Path) -> tuple[int | None, str, Path | None]:
    """Start a long bench, Ctrl-C it after its first token; (exit code or None, stderr, log)."""
    import os

    cwd.mkdir(parents=True, exist_ok=True)
    err_file = cwd / "stderr.txt"
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a hang dumps every thread on SIGABRT
    # a bench decodes its full length (generation may meet an end-of-text token first)
    with open(cwd / "stdout.txt", "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flashmoe", f"model.path={path}",
                                 "hardware=linux_cpu", "task=bench", "task.cold=true",
                                 "task.warmup=1", "task.repeats=1", "task.tokens=100000"],
                                cwd=cwd, stdout=out, stderr=err, env=env,
                                # a CI started in the background inherits SIGINT ignored;
                                # a person's terminal does not: restore the default
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        log, deadline = None, time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            logs = list((cwd / "runs").rglob("flashmoe.jsonl")) if (cwd / "runs").exists() else []
            if logs and "token_sampled" in logs[0].read_text():
                log = logs[0]
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)  # returns only if no thread keeps the process alive
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            code = None
    return code, err_file.read_text(), log


def test_ctrl_c_writes_interrupted_summary(tiny, tmp_path):
    path = tiny("qwen3_5_moe")
    code, err, log = _interrupt_once(path, tmp_path / "first")
    if code is None:  # hung: keep the thread dump, try once more so a rare race is visible
        first = err
        code, err, log = _interrupt_once(path, tmp_path / "second")
        assert code is not None, "hung twice after Ctrl-C; first dump:\n" + first[-4000:]
        import warnings

        warnings.warn("a Ctrl-C hung once (retried); thread dump:\n" + first[-4000:], stacklevel=1)
    assert code == 130, err
    assert log is not None
    (summary,) = [e for e in events(log.parent) if e["event"] == "run_summary"]
    assert summary["status"] == "interrupted"
    assert "Traceback" not in err


def test_empty_prompt_and_missing_tokenizer_one_line(tiny, tmp_path):
    import shutil

    path = tiny("qwen3_5_moe")
    out = flashmoe(tmp_path, f"model.path={path}", "hardware=linux_cpu", "prompt=")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert error_lines(out.stderr) == [
        'flashmoe: prompt is empty (0 tokens); give some text, e.g. prompt="Hello"']
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(path, bare)
    (bare / "tokenizer.json").unlink()
    out = flashmoe(tmp_path, f"model.path={bare}", "hardware=linux_cpu")
    lines = error_lines(out.stderr)
    assert out.returncode != 0 and len(lines) == 1 and "no tokenizer.json" in lines[0], lines
