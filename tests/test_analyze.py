"""python -m flashmoe.analyze on fake Hydra run and sweep dirs built in tmp_path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flashmoe.analyze import AnalyzeError, load_runs, summarize, swept_keys, to_csv, to_markdown
from flashmoe.analyze.__main__ import main
from flashmoe.errors import FlashMoeError

CONFIG = {
    "task": {"name": "bench"},
    "io": {"split": 1, "threads": 4},
    "model": {"experts_per_token": 4, "bits": 4},
    "hardware": {"name": "cpu"},
}


def summary(tok_s: float, io_ms: float, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "tok_s": tok_s, "ttft_s": 0.5, "expert_io_ms_per_token": io_ms,
        "expert_gb_per_token": 0.1, "peak_rss_gb": 3.25, "io_split": 1, "io_threads": 4,
        "hardware": "cpu", "experts_per_token": 4, "status": status, "fetch_gbps": 1.5,
        "probe_gbps": 1.6, "fetch_vs_probe": 0.9375, **extra,
    }


def make_run(path: Path, overrides: list[str], summaries: list[dict[str, Any]],
             tokens: int = 2, junk: list[str] = ()) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"event": "run_started", "timestamp": "2026-11-28T22:10:05Z"}]
    lines += [
        {"event": "token_sampled", "timestamp": "t", "token_id": 7, "position": i,
         "device_trip_ms": 1.0, "route_host_ms": 0.1, "expert_fetch_ms": 5.0,
         "expert_compute_ms": 2.0, "sampling_ms": 0.1, "bytes_read": 1000, "experts_fetched": 4}
        for i in range(tokens)
    ]
    lines += [{"event": "run_summary", "timestamp": "t", **s} for s in summaries]
    text = "".join(json.dumps(x) + "\n" for x in lines) + "".join(j + "\n" for j in junk)
    (path / "flashmoe.jsonl").write_text(text)
    return path


def make_sweep(path: Path, points: list[tuple[list[str], list[dict[str, Any]]]]) -> Path:
    path.mkdir(parents=True)
    (path / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    for n, (overrides, summaries) in enumerate(points):
        make_run(path / str(n), overrides, summaries)
    return path


def table(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.strip().splitlines()]


def test_split_sweep_table_csv_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = make_sweep(tmp_path / "multirun" / "2026-11-28_22-10-05", [
        (["task=bench", "io.split=4"], [summary(12.0, 30.0)]),
        (["task=bench", "io.split=1"], [summary(10.0, 45.0)]),
    ])
    assert main([str(sweep)]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[0] == ["io.split", "tok/s", "expert I/O ms/token", "fetch GB/s", "fetch_vs_probe",
                       "peak RSS GB", "status"]
    assert rows[2:] == [["1", "10.00", "45.0", "1.50", "0.94", "3.25", "ok"],
                        ["4", "12.00", "30.0", "1.50", "0.94", "3.25", "ok"]]
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,io.split,repeats,tokens,tok_s,ttft_s,")
    assert "probe_gbps" in csv_lines[0] and "summary.hardware" not in csv_lines[0]
    assert csv_lines[1].startswith("1,1,1,2,10.0,")
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experts_sweep_sorted_numerically_with_ppl_and_repeats(tmp_path: Path) -> None:
    ppl = {"ppl": 5.4321, "tokens_scored": 100, "kl_mean": 0.01234, "top1_agreement": 0.98}
    sweep = make_sweep(tmp_path / "sweep", [
        (["task=ppl", "model.experts_per_token=10"], [summary(2.0, 90.0, **ppl)]),
        (["task=ppl", "model.experts_per_token=2"],
         [summary(7.0, 20.0, **ppl), summary(9.0, 10.0, **ppl), summary(8.0, 30.0, **ppl)]),
        (["task=ppl", "model.experts_per_token=4"], [summary(5.0, 40.0, **ppl)]),
    ])
    runs = load_runs(sweep)
    assert swept_keys(runs) == ["model.experts_per_token"]
    rows = summarize(runs)
    assert [r.swept["model.experts_per_token"] for r in rows] == ["2", "4", "10"]
    assert rows[0].metrics["tok_s"] == 8.0 and rows[0].metrics["expert_io_ms_per_token"] == 20.0
    md = table(to_markdown(rows))
    assert md[0][-4:] == ["ppl", "kl_mean", "top1_agreement", "repeats"]
    assert md[2] == ["2", "8.00", "20.0", "1.50", "0.94", "3.25", "ok",
                     "5.432", "0.0123", "0.980", "3"]
    assert md[4][0] == "10" and md[4][-1] == "1"


def test_single_run_dir_and_config_fallback(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "runs" / "2026-11-28" / "22-10-05", ["task=bench"],
                       [summary(3.0, 60.0)])
    [row] = summarize(load_runs(run_dir))
    assert row.run == "22-10-05" and row.swept == {} and row.tokens == 2
    md = table(to_markdown([row]))
    assert md[0][0] == "tok/s" and md[2][0] == "3.00"
    # A parent holding two runs: a key overridden in one run falls back to the other's config.
    make_run(tmp_path / "runs" / "2026-11-28" / "23-00-00", ["task=bench", "io.threads=8"],
             [summary(4.0, 50.0)])
    rows = summarize(load_runs(tmp_path / "runs"))
    assert [(r.run, r.swept) for r in rows] == [
        ("2026-11-28/22-10-05", {"io.threads": "4"}), ("2026-11-28/23-00-00", {"io.threads": "8"})]


def test_error_status_and_missing_summary_are_shown(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path / "sweep", [
        (["hardware=cpu"], [summary(3.0, 60.0)]),
        (["hardware=h200"], [{"status": "oom", "peak_rss_gb": 127.5}]),
    ])
    make_run(sweep / "2", ["hardware=mac"], [])  # crashed before its summary
    rows = summarize(load_runs(sweep))
    md = table(to_markdown(rows))
    assert [r[0] for r in md[2:]] == ["cpu", "h200", "mac"]
    assert md[3] == ["h200", "-", "-", "-", "-", "127.50", "oom"]
    assert md[4][-1] == "no_summary"
    header = to_csv(rows).splitlines()[0].split(",")
    assert header[:2] == ["run", "hardware"] and "summary.hardware" in header


def test_malformed_lines_skipped_with_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_run(tmp_path / "r", ["task=bench"], [summary(3.0, 60.0)],
                       junk=["{not json", "[1, 2]", '{"event": "run_sum'])
    out = tmp_path / "out"
    assert main([str(run_dir), "--format", "csv", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 malformed line(s)" in captured.err and "first at line 5" in captured.err
    assert captured.out == (out / "summary.csv").read_text()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "summary.csv").exists()


def test_errors_are_flashmoe_errors(tmp_path: Path) -> None:
    assert issubclass(AnalyzeError, FlashMoeError)
    with pytest.raises(AnalyzeError, match="does not exist"):
        load_runs(tmp_path / "nope")
    with pytest.raises(AnalyzeError, match="flashmoe.jsonl"):
        load_runs(tmp_path)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_errors_exit_2_with_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "nope" if case == "missing" else tmp_path
    if case == "empty":
        (tmp_path / "notes.txt").write_text("no runs here\n")
    proc = subprocess.run([sys.executable, "-m", "flashmoe.analyze", str(path)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashmoe.analyze: ")
    assert "Traceback" not in proc.stderr
