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
        assert s["batch_compute"] == "joint"  # auto, on the CPU
        assert s["tok_s_aggregate"] > 0 and s["itl_p99_ms"] >= s["itl_p50_ms"] > 0
        assert abs(s["tok_s_per_sequence"] * n - s["tok_s_aggregate"]) < 1e-2 * s["tok_s_aggregate"]
        assert 0 < s["union_experts_per_token"] <= 4 * s["experts_per_token"]  # 4 MoE layers
    table = subprocess.run([sys.executable, "-m", "flashmoe.analyze", "sweep"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "| task.concurrency | aggregate tok/s" in table.stdout


def test_probe_times_only_the_trace_after_replaying_before(tmp_path):
    """`before` (a cold repeat's prompt-pass reads) is replayed untimed: not in bytes_read."""
    import os

    from flashmoe.bench.probe import probe

    f = tmp_path / "blob"
    f.write_bytes(os.urandom(8 * 4096))
    fd = os.open(f, os.O_RDONLY)
    try:
        res = probe([[(fd, 0, 4096), (fd, 8192, 4096)]], threads=2,
                    before=[[(fd, 4096, 16384)], [(fd, 0, 32768)]])
    finally:
        os.close(fd)
    assert res.bytes_read == 8192 and res.seconds > 0


def test_cold_probe_starts_each_repeat_from_its_own_page_cache_state(monkeypatch):
    """Cold: the engine dropped the page cache before every repeat, so each repeat's probe
    drops it too (a later repeat's identical ranges are not probed warm) and replays that
    repeat's prompt-pass reads untimed first; warm: no drop, nothing replayed first."""
    from types import SimpleNamespace

    from flashmoe.bench.probe import ProbeResult
    from flashmoe.tasks import bench

    calls = []
    monkeypatch.setattr(bench, "drop_page_cache", lambda files: calls.append("drop"))

    def fake_probe(trace, threads, before=()):
        calls.append(("probe", list(before), list(trace), threads))
        return ProbeResult(10**9 * len(trace), 1.0 * len(trace))  # 1 GB/s

    monkeypatch.setattr(bench, "probe", fake_probe)
    engine = SimpleNamespace(files=["f"])
    traces = [([["p1"]], [["d1"], ["d2"]]), ([["p2"]], [["d3"]]), ([["p3"]], [])]
    for cold in (True, False):
        calls.clear()
        cfg = SimpleNamespace(task=SimpleNamespace(cold=cold), io=SimpleNamespace(threads=3))
        probes = [bench._probe(engine, t, cfg) for t in traces]
        if cold:
            assert calls == ["drop", ("probe", [["p1"]], [["d1"], ["d2"]], 3),
                             "drop", ("probe", [["p2"]], [["d3"]], 3)]
        else:
            assert calls == [("probe", [], [["d1"], ["d2"]], 3), ("probe", [], [["d3"]], 3)]
        out = bench._probe_figures(probes, {"fetch_gbps": 0.5, "probe_tokens": 3})
        assert out["probe_gbps"] == 1.0 and out["fetch_vs_probe"] == 0.5
    none = bench._probe_figures([ProbeResult(0, 0.0)], {"fetch_gbps": 0.0, "probe_tokens": 1})
    assert none["fetch_vs_probe"] == 0.0 and "probe_note" in none


def test_vs_baseline_pairs_each_repeat_with_the_mlx_lm_run_after_it():
    """A repeat and the mlx-lm run right after it share the machine's load: vs_baseline is
    the median of the per-pair ratios, not a ratio of medians taken minutes apart."""
    from flashmoe.tasks.bench import _baseline

    reps = [{"tok_s": 10.0}, {"tok_s": 20.0}, {"tok_s": 12.0}]
    bases = [{"status": "ok", "limit": "none", "checkpoint_gb": 0.2, "tok_s": t,
              "peak_rss_gb": g} for t, g in ((10.0, 0.3), (40.0, 0.4), (12.0, 0.3))]
    out = _baseline(bases, reps)
    assert out["vs_baseline"] == 1.0 and out["baseline_tok_s"] == 12.0  # ratios 1, 0.5, 1
    assert out["baseline_runs"] == 3 and out["baseline_peak_rss_gb"] == 0.4
    oom = [bases[0], {"status": "oom", "limit": "8G", "checkpoint_gb": 15.0}]
    out = _baseline(oom, reps)
    assert out["baseline_status"] == "oom" and "vs_baseline" not in out
