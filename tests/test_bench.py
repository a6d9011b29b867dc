"""task=bench leaves a complete run_summary; analyze turns a sweep into a table, CSV and PNG."""
from __future__ import annotations

import json
import subprocess
import sys

BENCH_KEYS = {"tok_s", "ttft_s", "prompt_tok_s", "expert_io_ms_per_token", "expert_gb_per_token",
              "fetch_gbps", "probe_gbps", "fetch_vs_probe", "cache_hit_rate", "peak_rss_gb",
              "overlap_ratio", "compute_ms_per_token", "io_split", "io_threads", "hardware",
              "experts_per_token", "status"}


def summary(run_dir):
    lines = (run_dir / "flashmoe.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if '"run_summary"' in l][-1]


def test_bench_summary_and_sweep_analysis(tiny, tmp_path):
    path = tiny("qwen3_5_moe")
    args = [sys.executable, "-m", "flashmoe", "-m", "task=bench", f"model.path={path}",
            "hardware=linux_cpu", "cache=none", "io.split=1,2", "task.tokens=6", "task.repeats=2",
            "task.baseline=mlx_lm", "task.check=mlx_lm", "hydra.sweep.dir=sweep"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    runs = [tmp_path / "sweep" / n for n in ("0", "1")]
    for split, run in zip((1, 2), runs):
        s = summary(run)
        assert BENCH_KEYS <= s.keys(), BENCH_KEYS - s.keys()
        assert s["status"] == "ok" and s["io_split"] == split
        assert s["tok_s"] > 0 and s["fetch_vs_probe"] > 0 and s["probe_gbps"] > 0
        assert s["expert_gb_per_token"] > 0 and 0 <= s["cache_hit_rate"] <= 1
        assert s["baseline_status"] == "ok" and s["baseline_tok_s"] > 0 and s["vs_baseline"] > 0
        assert s["tokens_match"] is True and s["check_status"] == "ok"
    table = subprocess.run([sys.executable, "-m", "flashmoe.analyze", "sweep"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = [l for l in table.stdout.splitlines() if l.startswith("| ") and "---" not in l]
    assert rows[0].startswith("| io.split") and len(rows) == 3  # header + one row per run
    assert rows[1].startswith("| 1 ") and rows[2].startswith("| 2 ")
    assert (tmp_path / "sweep" / "summary.csv").read_text().count("\n") >= 3
    assert (tmp_path / "sweep" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_replays_direct_io_reads(tmp_path):
    """The probe must replay O_DIRECT descriptors too (aligned buffers), as io.direct uses."""
    import os

    from flashmoe.bench.probe import probe

    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 * 4096))
    try:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        import pytest

        pytest.skip("this filesystem has no O_DIRECT")
    try:
        res = probe([[(fd, 0, 8192)], [(fd, 4096, 8192)]], threads=2)
    finally:
        os.close(fd)
    assert res.bytes_read == 16384 and res.gbps > 0


def test_check_refuses_a_speed_for_other_tokens():
    """task.check=mlx_lm: a timed stream that leaves mlx-lm's is an error, not a speed."""
    import pytest

    from flashmoe.tasks.bench import BenchCheckError, check_tokens

    ok = {"status": "ok", "token_ids": [5, 6, 7, 8]}
    assert check_tokens([[5, 6, 7, 8], [5, 6, 7, 8]], ok)["tokens_match"] is True
    with pytest.raises(BenchCheckError, match="repeat 2: generated token 2 is 9 but resident "
                                              "mlx-lm gives 7"):
        check_tokens([[5, 6, 7, 8], [5, 6, 9, 8]], ok)
    with pytest.raises(BenchCheckError, match="token 3"):
        check_tokens([[5, 6, 7]], ok)
    assert check_tokens([[5, 6, 7, 8]], ok, warm=[5, 6])["tokens_match"] is True
    with pytest.raises(BenchCheckError, match="warm-up pass's token 1 is 4"):
        check_tokens([[5, 6, 7, 8]], ok, warm=[5, 4, 7, 8])  # the timed pass alone is right
    skipped = check_tokens([[1]], {"status": "oom", "limit": "8G"})
    assert skipped["tokens_match"] is None and skipped["check_status"] == "oom"


def test_bench_concurrency_sweep(tiny, tmp_path):
    """task.concurrency=1,3: the batched path's figures, every stream equal to its solo run."""
    path = tiny("qwen3_5_moe")
    args = [sys.executable, "-m", "flashmoe", "-m", "task=bench", f"model.path={path}",
            "hardware=linux_cpu", "cache=none", "task.concurrency=1,3", "task.tokens=4",
            "task.repeats=1", "task.warmup=1", "hydra.sweep.dir=sweep"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for n, run in zip((1, 3), ("0", "1")):
        s = summary(tmp_path / "sweep" / run)
        assert s["status"] == "ok" and s["concurrency"] == n and s["tokens_match_solo"] is True
        assert s["tok_s_aggregate"] > 0 and s["itl_p99_ms"] >= s["itl_p50_ms"] > 0
        assert abs(s["tok_s_per_sequence"] * n - s["tok_s_aggregate"]) < 1e-2 * s["tok_s_aggregate"]
        assert 0 < s["union_experts_per_token"] <= 4 * s["experts_per_token"]  # 4 MoE layers
    table = subprocess.run([sys.executable, "-m", "flashmoe.analyze", "sweep"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "| task.concurrency | aggregate tok/s" in table.stdout
