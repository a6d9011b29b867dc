"""One line per run from flashmoe.jsonl logs: the run summary's headline keys and what the
decode steps did (whole-token steps, roll-backs, host-tier promotions, device trips), for
device calls that can bring back only a few files.

    python bench/jsonl_digest.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = ("status", "tok_s", "tokens_match", "vs_baseline", "baseline_tok_s", "cache_hit_rate",
        "expert_gb_per_token", "fetch_vs_probe", "overlap_ratio", "tok_s_aggregate",
        "tok_s_per_sequence", "tokens_match_solo", "concurrency", "batch_compute",
        "experts_per_token", "device_hit_rate", "host_hit_rate", "host_demotions_copied",
        "host_demotions_kept", "host_stashed")


def digest(run: Path) -> str:
    summary, steps = {}, []
    log = run / "flashmoe.jsonl"
    if not log.exists():
        return f"{run}: no log (the run did not start)"
    for line in log.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "run_summary":
            summary = ev
        elif ev.get("event") == "token_sampled":
            steps.append(ev)
    head = {k: summary[k] for k in KEYS if k in summary}
    if steps:
        head.update(
            steps=len(steps),
            speculated_layers=sum(s.get("speculated_layers", 0) for s in steps),
            rolled_back=sum("speculation_missed_at" in s for s in steps),
            built_ahead=sum(s.get("built_ahead", 0) for s in steps),
            host_hits=sum(s.get("experts_host_hit", 0) for s in steps),
            host_hits_per_token_median=statistics.median(
                s.get("experts_host_hit", 0) for s in steps),
            experts_fetched=sum(s.get("experts_fetched", 0) for s in steps),
            device_trip_ms_median=round(statistics.median(
                s.get("device_trip_ms", 0.0) for s in steps), 3))
    return f"{run}: {json.dumps(head)}"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(digest(Path(arg)))
