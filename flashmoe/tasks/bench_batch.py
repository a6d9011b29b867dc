"""task=bench task.concurrency=N: N sequences decoded together through the batched step.

Reports aggregate and per-sequence decode tok/s, expert GB read per token, the experts a
token needed after the batch's union (sharing), p50/p99 inter-token latency, and whether
every stream's tokens equal the same prompt run alone (task.verify_solo)."""
from __future__ import annotations

import statistics
import time
from typing import Any

from omegaconf import DictConfig

from flashmoe.config import model_kind
from flashmoe.engine import Engine
from flashmoe.bench.probe import drop_page_cache
from flashmoe.serve.runner import BatchRunner
from flashmoe.serve.sampler import SeqSampler
from flashmoe.serve.sequence import Sequence
from flashmoe.tasks.common import SYNTHETIC_NOTE, open_engine, run_summary, warn_device

TOPICS = ("a lighthouse keeper", "a cartographer", "a tide clock", "a ship's cat", "a storm",
          "a harbour pilot", "a sea chart", "a message in a bottle")


def prompts(base: str, n: int) -> list[str]:
    """n distinct prompts of different lengths (stream i: the base prompt, then a twist)."""
    return [base if i == 0 else f"{base} Include {TOPICS[i % len(TOPICS)]}" + " and more" * (i // 8)
            for i in range(n)]


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    t = cfg.task
    engine = state["engine"] = await open_engine(cfg)
    warn_device(engine, log)
    ids = [engine.encode(p) for p in prompts(t.prompt, t.concurrency)]
    runner = BatchRunner(engine, compute=t.batch_compute)
    if t.warmup:
        await _batch(runner, ids, t.warmup)
    reps = []
    for r in range(t.repeats):
        if t.cold:
            engine.reset_cache()
            drop_page_cache(engine.files)
        rep, streams = await _batch(runner, ids, t.tokens)
        log.info("bench_repeat", repeat=r, **rep)
        reps.append(rep)
    extra = {k: round(statistics.median(r[k] for r in reps), 4) for k in reps[0]}
    if t.verify_solo:
        solo = [await _solo(engine, p, t.tokens + 1) for p in ids]
        extra["tokens_match_solo"] = solo == streams
        log.info("bench_solo_checked", match=extra["tokens_match_solo"], streams=len(ids))
    extra.update(concurrency=t.concurrency, bench_tokens=t.tokens, repeats=t.repeats,
                 bench_cold=t.cold,  # how the rows were computed, `auto` resolved
                 batch_compute="joint" if runner.batched else "per_sequence")
    if model_kind(cfg.model) in ("demo", "synth"):
        extra["note"] = SYNTHETIC_NOTE
    return {**run_summary(cfg, engine, None, "ok"), **extra}


async def _batch(runner: BatchRunner, ids: list[list[int]], n: int) -> tuple[dict, list]:
    """Prefill every stream (exact, alone), then n decode steps of all of them together."""
    seqs = [Sequence(f"s{i}", p, n + 1, SeqSampler(), runner.model.tokenizer.detokenizer)
            for i, p in enumerate(ids)]
    for s in seqs:
        while not (await runner.prefill(s))[0]:
            pass
    steps, cpu0 = [], time.process_time()
    for _ in range(n + 1):  # the first step samples each stream's first token
        toks, rep = await runner.decode(seqs)
        for s, tok in zip(seqs, toks):
            s.accept(tok)
        steps.append(rep)
    figs = _figures(steps, seqs)
    # CPU seconds of this process per token: robust to other processes sharing the cores
    figs["cpu_s_per_token"] = round((time.process_time() - cpu0) / max((n + 1) * len(seqs), 1), 4)
    return figs, [s.generated for s in seqs]


def _figures(steps: list, seqs: list[Sequence]) -> dict:
    n_tok = sum(r.tokens for r in steps)
    secs = sum(r.seconds for r in steps)
    read = sum(r.stats.bytes_read for r in steps)
    hits = sum(r.stats.experts_hit for r in steps)
    fetched = sum(r.stats.experts_fetched for r in steps)
    gaps = sorted(b - a for s in seqs for a, b in zip(s.t_tokens, s.t_tokens[1:]))
    pct = (lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3) if gaps else (lambda q: 0.0)
    return {
        "tok_s_aggregate": round(n_tok / secs, 4) if secs else 0.0,
        "tok_s_per_sequence": round(len(steps) / secs, 4) if secs else 0.0,
        "expert_gb_per_token": round(read / n_tok / 1e9, 6) if n_tok else 0.0,
        # experts each token needed after the batch's union (K × MoE layers when nothing shared)
        "union_experts_per_token": round((hits + fetched) / n_tok, 3) if n_tok else 0.0,
        "cache_hit_rate": round(hits / (hits + fetched), 4) if hits + fetched else 0.0,
        "itl_p50_ms": round(pct(0.5), 3), "itl_p99_ms": round(pct(0.99), 3),
        "step_ms_median": round(statistics.median(r.seconds for r in steps) * 1e3, 3),
        "expert_fetch_ms_per_step": round(sum(r.stats.expert_fetch_ms for r in steps)
                                          / len(steps), 3),
    }


async def _solo(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """The same prompt alone through Engine.generate (what `python -m flashmoe` runs)."""
    return [ev.token_id async for ev in engine.generate(prompt, n)]
