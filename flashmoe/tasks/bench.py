"""task=bench: fixed prompt, warm-up, N decode tokens × repeats; medians, raw-disk probe,
overlap ratio and an optional mlx-lm side-by-side, all in the run_summary."""
from __future__ import annotations

import statistics
from typing import Any

from omegaconf import DictConfig
from rich.progress import Progress

from flashmoe.constants import GIB
from flashmoe.errors import FlashMoeError
from flashmoe.engine import Engine, ReadTrace, Session
from flashmoe.bench.baseline import run_baseline
from flashmoe.bench.probe import ProbeResult, drop_page_cache, probe
from flashmoe.runtime.platform_io import cold_method
from flashmoe.tasks.common import (STAGE_KEYS, SYNTHETIC_NOTE, follower, open_engine,
                                   run_summary, token_figures, warn_device)
from flashmoe.config import model_kind


class BenchCheckError(FlashMoeError):
    """The timed tokens are not mlx-lm's: the bench withholds its speed."""


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    t = cfg.task
    if t.concurrency is not None:  # the batched path (task=serve's decode step)
        from flashmoe.tasks import bench_batch

        return await bench_batch.run(cfg, log, state)
    engine = state["engine"] = await open_engine(cfg)
    warn_device(engine, log)
    prompt = engine.encode(t.prompt)
    # warm: one untimed pass over the same token stream, so the page cache holds its experts
    # and engine and probe both read warm pages; cold: a short warm-up (allocations) only
    warm_tokens = t.warmup if t.cold else max(t.warmup, t.tokens)
    warm_stream: list[int] = []
    if warm_tokens:
        await _decode(engine.session(), prompt, warm_tokens, log=None, stream=warm_stream)
    reps, probes, streams, bases = await _repeats(engine, prompt, cfg, log)
    extra = _medians(reps)
    read_bytes = sum(r["decode_bytes"] for r in reps)
    read_ms = sum(r["decode_fetch_ms"] for r in reps)
    extra["fetch_gbps"] = round(read_bytes / 1e6 / read_ms, 3) if read_ms else 0.0
    extra["probe_tokens"] = sum(r["generated_tokens"] - 1 for r in reps) or 1
    extra.update(_probe_figures(probes, extra))
    extra.update(await _overlap(engine, prompt, t.tokens, extra))
    if t.check == "mlx_lm" and not bases:
        bases.append(_run_baseline(engine, prompt, t.tokens, cfg))
    if t.check == "mlx_lm":
        extra.update(check_tokens(streams, bases[0], warm_stream))
    if t.baseline == "mlx_lm":
        extra.update(_baseline(bases, reps))
    extra.update(bench_cold=t.cold, bench_tokens=t.tokens, repeats=t.repeats)
    if t.cold:  # what "cold" meant on this platform
        extra["cold_method"] = cold_method()
    if model_kind(cfg.model) in ("demo", "synth"):
        extra["note"] = SYNTHETIC_NOTE
    out = run_summary(cfg, engine, None, "ok")  # the summary figures are the medians above
    out.update(extra)
    return out


async def _repeats(engine: Engine, prompt: list[int], cfg: DictConfig,
                   log: Any) -> tuple[list[dict], list[ProbeResult], list[list[int]], list[dict]]:
    """The timed repeats, each followed by the probe of its reads and, with
    task.baseline=mlx_lm, an mlx-lm run: each pair shares the machine's load of that moment
    (the shared CPU box's disk and cores swing 2x within minutes)."""
    t = cfg.task
    reps, probes, streams, bases = [], [], [], []
    for r in range(t.repeats):
        rep, rep_trace, stream = await _measured(engine, prompt, t.tokens, t.cold, log, r)
        probes.append(_probe(engine, rep_trace, cfg))
        log.info("repeat_probed", repeat=r, probe_gbps=round(probes[-1].gbps, 3),
                 fetch_gbps=rep["fetch_gbps"])
        reps.append(rep)
        streams.append(stream)
        if t.baseline == "mlx_lm" and (not bases or bases[-1]["status"] == "ok"):
            bases.append(_resident(engine, prompt, t.tokens, cfg))  # timed now: never reused
    return reps, probes, streams, bases


async def _decode(session: Session, prompt: list[int], n: int, log: Any,
                  progress: Progress | None = None, task_id: Any = None,
                  trace: ReadTrace | None = None, stream: list[int] | None = None) -> int:
    """Generate n tokens (no stop token: a bench always runs its full length)."""
    first_trace = 0
    async for ev in session.generate(prompt, n):
        if stream is not None:
            stream.append(ev.token_id)
        if ev.position == len(prompt) and trace is not None:
            first_trace = trace.mark()  # reads of the prompt pass
        if log is not None:
            log.info("token_sampled", token_id=ev.token_id, position=ev.position, **ev.stats)
        if progress is not None:
            progress.advance(task_id)
    return first_trace


async def _measured(engine: Engine, prompt: list[int], n: int, cold: bool, log: Any,
                    rep: int) -> tuple[dict, tuple[list, list], list[int]]:
    """One timed repeat: its figures, its reads (prompt pass, decode) and its tokens."""
    if cold:
        engine.reset_cache()
        drop_page_cache(engine.files)
    trace, stream = ReadTrace(), []
    session = engine.session(observer=trace)
    with Progress(transient=True, disable=follower(engine)) as bar:  # stderr: stdout is text
        tid = bar.add_task(f"bench repeat {rep + 1}", total=n)
        skip = await _decode(session, prompt, n, log, bar, tid, trace, stream)
    totals = session.totals
    rep_figs = token_figures(totals)
    rep_figs["decode_bytes"] = sum(s.bytes_read for s in totals.steps[1:])
    rep_figs["decode_fetch_ms"] = sum(s.expert_fetch_ms for s in totals.steps[1:])
    hits = sum(s.experts_hit for s in totals.steps[1:])
    fetched = sum(s.experts_fetched for s in totals.steps[1:])
    rep_figs["cache_hit_rate"] = round(hits / (hits + fetched), 4) if hits + fetched else 0.0
    host = sum(s.extra.get("experts_host_hit", 0) for s in totals.steps[1:])
    if host:  # the host tier's share of all lookups (cache.host_budget_gb)
        rep_figs["host_hit_rate"] = round(host / (hits + fetched + host), 4)
        rep_figs["device_hit_rate"] = round(hits / (hits + fetched + host), 4)
    log.info("bench_repeat", repeat=rep, **rep_figs)
    return rep_figs, (trace.batches[:skip], trace.batches[skip:]), stream


def _medians(reps: list[dict]) -> dict:
    keys = [k for k, v in reps[0].items() if isinstance(v, (int, float))]
    return {k: round(statistics.median(r[k] for r in reps), 4) for k in keys}


def _probe(engine: Engine, trace: tuple[list, list], cfg: DictConfig) -> ProbeResult:
    """Raw preads of one repeat's decode-step ranges, same order, same io.threads, from the
    same page-cache state: cold, from a dropped cache with the repeat's prompt-pass reads
    replayed untimed first, as the engine's repeat did."""
    prompt_reads, decode = trace
    if not decode:
        return ProbeResult(0, 0.0)
    if cfg.task.cold:
        drop_page_cache(engine.files)
    return probe(decode, cfg.io.threads, before=prompt_reads if cfg.task.cold else ())


def _probe_figures(probes: list[ProbeResult], figs: dict) -> dict:
    if not any(p.bytes_read for p in probes):
        return {"probe_gbps": 0.0, "fetch_vs_probe": 0.0, "probe_note": "no expert reads to probe"}
    res = ProbeResult(sum(p.bytes_read for p in probes), sum(p.seconds for p in probes))
    gbps = res.gbps
    return {"probe_gbps": round(gbps, 3),
            "fetch_vs_probe": round(figs["fetch_gbps"] / gbps, 4) if gbps else 0.0,
            "probe_ms_per_token": round(res.seconds * 1e3 / figs["probe_tokens"], 3)}


async def _overlap(engine: Engine, prompt: list[int], n: int, figs: dict) -> dict:
    """Compute alone (reads skipped, stale slots) vs reads alone (the probe) vs both."""
    engine.reset_cache()
    session = engine.session(read_experts=False)
    try:
        await _decode(session, prompt, n, log=None)
    finally:
        engine.reset_cache()  # those slots hold stale bytes: never serve them
    compute = [sum(s.as_dict()[k] for k in STAGE_KEYS) for s in session.totals.steps[1:]]
    compute_ms = statistics.median(compute) if compute else 0.0
    read_ms = figs.get("probe_ms_per_token", 0.0)
    token_ms = figs["median_token_ms"]
    alone = max(compute_ms, read_ms)
    return {"compute_ms_per_token": round(compute_ms, 3),
            "overlap_ratio": round(token_ms / alone, 4) if alone else 0.0}


_BASELINES: dict[tuple, dict] = {}  # one resident reference per setting in a sweep's process


def _run_baseline(engine: Engine, prompt: list[int], n: int, cfg: DictConfig) -> dict:
    """Resident mlx-lm's tokens for task.check on the same prompt and K; a multirun sweep that
    varies only flashmoe's own settings (cache, io) reuses the reference it already ran
    instead of reloading it. Timed baselines (task.baseline) are fresh runs, paired."""
    key = (str(engine.path), tuple(prompt), n, engine.options.dtype, engine.k,
           float(cfg.hardware.memory_gb))
    if key not in _BASELINES or _BASELINES[key]["status"] != "ok":
        _BASELINES[key] = _resident(engine, prompt, n, cfg)
    return _BASELINES[key]


def _resident(engine: Engine, prompt: list[int], n: int, cfg: DictConfig) -> dict:
    size_gb = sum(f.stat().st_size for f in engine.path.glob("*.safetensors")) / GIB
    limit = cfg.hardware.memory_gb if size_gb > cfg.hardware.memory_gb else None
    res = run_baseline(engine.path, prompt, n, engine.options.dtype, engine.k, limit_gb=limit)
    return {**res, "checkpoint_gb": round(size_gb, 3)}


def _baseline(bases: list[dict], reps: list[dict]) -> dict:
    """mlx-lm's median tok/s, and vs_baseline as the median of each repeat's ratio to the
    mlx-lm run right after it (paired: both saw the same load)."""
    res = next((b for b in bases if b["status"] != "ok"), bases[0])
    out = {"baseline": "mlx_lm", "baseline_status": res["status"], "baseline_limit": res["limit"],
           "checkpoint_gb": res["checkpoint_gb"], "baseline_runs": len(bases)}
    if res["status"] == "ok":
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(reps, bases) if b["tok_s"]]
        out.update(baseline_tok_s=round(statistics.median(b["tok_s"] for b in bases), 3),
                   baseline_peak_rss_gb=round(max(b["peak_rss_gb"] for b in bases), 3),
                   vs_baseline=round(statistics.median(ratios), 4) if ratios else 0.0)
    else:
        out["baseline_error"] = res.get("error", res["status"])
    return out


def check_tokens(streams: list[list[int]], baseline: dict,
                 warm: list[int] | None = None) -> dict:
    """task.check=mlx_lm: every timed stream, and the untimed warm-up pass over the same prompt
    (as far as it went), must be resident mlx-lm's greedy stream.

    A bench whose tokens differ measured something other than the model: no speed is reported
    (one flashmoe: line, status=error). A reference that could not run says so instead."""
    if baseline["status"] != "ok":
        return {"tokens_match": None, "check_status": baseline["status"],
                "check_error": baseline.get("error", baseline["status"])}
    want = baseline["token_ids"]
    if warm and warm != want[:len(warm)]:
        at = next(i for i, (a, b) in enumerate(zip(warm, want)) if a != b)
        raise BenchCheckError(
            f"the warm-up pass's token {at} is {warm[at]} but resident mlx-lm gives {want[at]}: "
            "the same prompt decoded another stream before the timed repeats (task.check=mlx_lm)."
            " Report this with the run directory's flashmoe.jsonl")
    for r, got in enumerate(streams):
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                      min(len(got), len(want)))
            raise BenchCheckError(
                f"bench repeat {r + 1}: generated token {at} is {got[at] if at < len(got) else None}"
                f" but resident mlx-lm gives {want[at] if at < len(want) else None}; the speed of "
                "a run that decodes other tokens is not reported (task.check=mlx_lm). Report "
                "this with the run directory's flashmoe.jsonl")
    return {"tokens_match": True, "check_status": "ok"}
