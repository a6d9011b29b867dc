"""The launched-world side of a run: this rank's ExpertParallel from `dist.*`, what the ranks
must agree on, and rank 0's summary with every rank's I/O (README "Several machines")."""
from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from flashmoe.runtime.dist import ExpertParallel

# per-rank figures gathered into rank 0's run_summary (key -> summary key of the list)
PER_RANK = ("expert_gb_per_token", "expert_gb_total", "allreduce_ms_per_token",
            "cache_hit_rate", "tok_s")
# config that may differ between ranks (each machine its own disk, cache and threads)
LOCAL_KEYS = ("hardware", "io", "cache", "run_dir", "debug", "dist")


def parallel_from(cfg: DictConfig) -> ExpertParallel | None:
    """This process's rank in the launched world (None: one process). Repeat calls return the
    same group: MLX keeps the first successful init."""
    d = cfg.get("dist")
    if d is None:
        return None
    return ExpertParallel.detect(d.strategy, d.backend, d.timeout_s, d.connect_timeout_s)


def run_context(cfg: DictConfig, prompt_text: str | None = None) -> str:
    """The resolved config minus per-machine keys, plus a prompt read from stdin or a file:
    every rank must run the same task on the same text."""
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in LOCAL_KEYS and k != "hydra"}
    return repr((sorted(keep.items(), key=lambda kv: kv[0]), prompt_text))


async def merge_summary(par: ExpertParallel, run: Any, summary: dict) -> dict:
    """Every rank's figures to every rank; rank 0's summary gets the lists and the sums."""
    mine = np.array([float(summary.get(k) or 0.0) for k in PER_RANK], dtype=np.float32)
    got = await par.all_gather(run, mine, "the end-of-run summary")  # [N, len(PER_RANK)]
    out = {**summary, "rank": par.rank, "world_size": par.size, "dist_backend": par.backend,
           "dist_strategy": "expert"}
    for j, key in enumerate(PER_RANK):
        out[f"{key}_per_rank"] = [round(float(v), 6) for v in got[:, j]]
    out["expert_gb_per_token"] = round(float(got[:, 0].sum()), 6)  # the whole world's reads
    out["expert_gb_total"] = round(float(got[:, 1].sum()), 6)
    return out
