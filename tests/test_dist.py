"""Two ranks on loopback (mx.distributed ring backend, 127.0.0.1): each rank reads and
computes its share of the experts, and the tokens and logits are those of one process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flashmoe.engine import Engine, EngineOptions
from tests.conftest import error_lines
from tests.fixtures.tiny import FAMILIES  # every family, those proxied through mlx-lm too
from tests.reference import expert_nbytes

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8, 200, 61, 3]
STEPS = 8
ROOT = Path(__file__).resolve().parents[1]


def hostfile(tmp: Path) -> Path:
    """A ring hostfile on two free loopback ports."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    path = tmp / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return path


def launch(tmp: Path, argv: list[str], **env: str) -> list[subprocess.Popen]:
    """Start two ranks as mlx.launch does for the ring backend (MLX_RANK, MLX_HOSTFILE)."""
    hosts = hostfile(tmp)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hosts), **env}
    return [subprocess.Popen([sys.executable, *argv], cwd=tmp, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**base, "MLX_RANK": str(r)}) for r in range(2)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung: the run must end within bounded time") from None
        out.append((p.returncode, o, e))
    return out


class Reads:
    """Which experts a single process read, per layer (maps read offsets to expert ids)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.experts = engine, []

    def expert_reads(self, layer: int, ranges: list) -> None:
        first = {(self.engine.store.ranges(layer, e)[0].offset): e
                 for e in range(self.engine.num_experts)}
        self.experts += [first[off] for _, off, _ in ranges if off in first]


async def single(path: Path, **opts) -> dict:
    engine = await Engine.open(path, EngineOptions(**opts), tokenizer=False)
    reads = Reads(engine)
    try:
        session = engine.session(observer=reads)
        last = (await session.logits(PROMPT))[-1]
        toks = [ev.token_id async for ev in session.generate(PROMPT, STEPS)]
    finally:
        await engine.aclose()
    return {"tokens": toks, "last": last, "experts": reads.experts,
            "bytes_read": sum(s.bytes_read for s in session.totals.steps)}


@pytest.mark.slow
async def test_two_ranks_equal_one_process_on_every_family(tiny, tmp_path):
    """Tokens and logits bit-identical on every family (the five native ones and those run
    through mlx-lm's own forward); with cache policy none each rank reads exactly its share;
    a union larger than a rank's slots runs in chunks."""
    paths = {f: tiny(f) for f in FAMILIES}
    nbytes, _ = expert_nbytes(paths["qwen3_5_moe"])
    small = {"cache_budget_gb": 2.5 * nbytes / 2**30}  # 2 slots per rank: chunks
    jobs = [{"path": str(paths[f]), "prompt": PROMPT, "steps": STEPS, "cache_policy": "none"}
            for f in FAMILIES]
    jobs.append({"path": str(paths["qwen3_5_moe"]), "prompt": PROMPT, "steps": STEPS,
                 "experts_per_token": 2, **small})
    procs = launch(tmp_path, [str(ROOT / "tests" / "dist_child.py"), "out{rank}.json",
                              json.dumps(jobs)])
    for rc, _, err in finish(procs, timeout=240):
        assert rc == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"out{r}.json").read_text())["jobs"] for r in range(2)]
    for i, job in enumerate(jobs):
        opts = {k: v for k, v in job.items() if k not in ("path", "prompt", "steps")}
        ref = await single(Path(job["path"]), **opts)
        for r in range(2):
            got = ranks[r][i]
            assert got["tokens"] == ref["tokens"], (job["path"], r)
            assert np.array_equal(np.array(got["last"], dtype=np.float32), ref["last"])
        if job.get("cache_policy") == "none":  # every fetch reads: bytes follow the routing
            per_expert = ref["bytes_read"] // len(ref["experts"])
            for r in range(2):
                lo, hi = ranks[r][i]["share"]
                mine = sum(lo <= e < hi for e in ref["experts"])
                assert 0 < ranks[r][i]["bytes_read"] == mine * per_expert
        else:
            assert all(ranks[r][i]["chunks"] > 0 for r in range(2))


def first_token(log: Path, wait_s: float = 120) -> Path:
    """Wait until rank 0's log has its first token_sampled line; returns the log's path."""
    deadline = time.time() + wait_s
    while time.time() < deadline and "token_sampled" not in (log.read_text() if log.exists()
                                                                 else ""):
        time.sleep(0.2)
    return log


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_on_the_other(tiny, tmp_path):
    """SIGKILL rank 1 mid-generation: rank 0 ends within seconds with one line naming it."""
    path = tiny("qwen3_moe")
    procs = launch(tmp_path, ["-m", "flashmoe", f"model.path={path}", "hardware=linux_cpu",
                              "max_tokens=4000", "prompt=hello", "dist.backend=ring",
                              f"run_dir={tmp_path / 'run'}"])
    log = first_token(tmp_path / "run" / "flashmoe.jsonl")
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    (rc, out, err), _ = finish(procs, timeout=60)
    assert time.time() - t0 < 30
    lines = [x for x in error_lines(err) if x.startswith("flashmoe:")]
    assert rc == 1 and len(lines) == 1, err[-2000:]
    assert "rank 0: lost the connection to rank 1" in lines[0]
    summary = [json.loads(x) for x in log.read_text().splitlines()][-1]
    assert summary["event"] == "run_summary" and summary["status"] == "error"
    assert summary["rank"] == 0


@pytest.mark.slow
def test_a_silent_rank_times_out_and_mismatch_is_refused(tiny, tmp_path):
    """A paused rank (SIGSTOP) ends the run after dist.timeout_s, never a hang; ranks with
    different configs are refused at start."""
    path = tiny("qwen3_moe")
    common = ["-m", "flashmoe", f"model.path={path}", "hardware=linux_cpu", "prompt=hello",
              "dist.backend=ring", f"run_dir={tmp_path / 'run'}", "dist.timeout_s=3"]
    procs = launch(tmp_path, [*common, "max_tokens=4000"])
    first_token(tmp_path / "run" / "flashmoe.jsonl")
    procs[1].send_signal(signal.SIGSTOP)
    try:
        rc, _, err = finish(procs[:1], timeout=40)[0]
    finally:
        procs[1].kill()
        procs[1].communicate()
    lines = [x for x in error_lines(err) if x.startswith("flashmoe:")]
    assert rc == 1 and len(lines) == 1 and "no answer from rank 1 for 3s" in lines[0], err[-2000:]

    hosts = hostfile(tmp_path)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hosts)}
    procs = [subprocess.Popen([sys.executable, *common, f"max_tokens={8 + r}",
                               f"run_dir={tmp_path / f'mm{r}'}"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "MLX_RANK": str(r)}) for r in range(2)]
    for r, (rc, _, err) in enumerate(finish(procs, timeout=120)):
        lines = [x for x in error_lines(err) if x.startswith("flashmoe:")]
        assert rc == 1 and len(lines) == 1, err[-2000:]
        assert f"rank {1 - r} runs a different task config" in lines[0]


@pytest.mark.slow
def test_mlx_launch_generate_writes_text_once_and_logs_every_rank(tiny, tmp_path):
    """`mlx.launch -n 2 --backend ring -- python -m flashmoe`: the text of one process on
    stdout (rank 0 only), each rank's own JSONL with `rank` in every event, and rank 0's
    summary with every rank's I/O."""
    path = tiny("qwen3_moe")
    args = ["-m", "flashmoe", f"model.path={path}", "hardware=linux_cpu", "prompt=hello",
            "max_tokens=6", "cache.policy=none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, *args, f"run_dir={tmp_path / 'one'}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    port = int(json.loads(hostfile(tmp_path).read_text())[0][0].split(":")[1])
    launcher = Path(sys.executable).with_name("mlx.launch")
    two = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--starting-port",
                          str(port), "--", sys.executable, *args, "dist.backend=ring",
                          f"run_dir={tmp_path / 'two'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    logs = [tmp_path / "two" / n for n in ("flashmoe.jsonl", "flashmoe.rank1.jsonl")]
    for r, log in enumerate(logs):
        evs = [json.loads(x) for x in log.read_text().splitlines()]
        assert evs and all(e["rank"] == r and e["world_size"] == 2 for e in evs)
    summary = [json.loads(x) for x in logs[0].read_text().splitlines()][-1]
    per_rank = summary["expert_gb_per_token_per_rank"]
    assert len(per_rank) == 2 and all(v > 0 for v in per_rank)
    assert summary["expert_gb_per_token"] == pytest.approx(sum(per_rank), rel=1e-3)
    assert summary["allreduce_ms_per_token"] > 0


@pytest.mark.slow
def test_a_rank_that_never_connects_ends_the_run(tiny, tmp_path):
    """Rank 0 alone (rank 1 never starts): refused after dist.connect_timeout_s, not a hang."""
    path = tiny("qwen3_moe")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hostfile(tmp_path)),
           "MLX_RANK": "0"}
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "flashmoe", f"model.path={path}",
                          "hardware=linux_cpu", "prompt=hello", "dist.backend=ring",
                          "dist.connect_timeout_s=2", f"run_dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode in (-9, 137) and time.time() - t0 < 30  # SIGKILLed by its watchdog
    lines = [x for x in run.stderr.splitlines() if x.startswith("flashmoe:")]
    assert len(lines) == 1 and "rank 0: could not connect to the other ranks within 2s" \
        in lines[0], run.stderr[-2000:]


def test_ranks_must_agree_on_a_piped_prompt():
    """A prompt from stdin or a file is part of what ranks compare at start, as the config is."""
    from flashmoe.config import compose_config
    from flashmoe.tasks.dist import run_context

    cfg = compose_config(["hardware=linux_cpu"])
    assert run_context(cfg, "a question") == run_context(cfg, "a question")
    assert run_context(cfg, "a question") != run_context(cfg, "another question")
    assert run_context(cfg, None) != run_context(cfg, "a question")
