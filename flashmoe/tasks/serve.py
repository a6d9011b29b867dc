"""task=serve: the OpenAI-compatible server; stays up until Ctrl-C/SIGTERM, then drains."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any, Iterator

import uvicorn
from omegaconf import DictConfig

from flashmoe.config import model_kind
from flashmoe.engine import Engine
from flashmoe.serve.app import ServeState, build_app
from flashmoe.serve.metrics import Metrics
from flashmoe.serve.protocol import Defaults, Limits
from flashmoe.serve.runner import BatchRunner
from flashmoe.serve.scheduler import Scheduler
from flashmoe.tasks.common import (SYNTHETIC_NOTE, max_context, open_engine, run_summary,
                                   warn_device)


class _Server(uvicorn.Server):
    """uvicorn without its own signal capture: the task decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def gauges(engine: Engine, sch: Scheduler) -> dict[str, float]:
    hits, misses = engine.cache_stats()
    pools = engine.unique_pools()
    return {"active_sequences": sch.running, "queued_sequences": len(sch.waiting),
            "slots_pinned": sum(p.n - p.free_slots() for p in pools),
            "expert_slots": sum(p.n for p in pools),
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0}


def model_id(cfg: DictConfig, engine: Engine) -> str:
    kind = model_kind(cfg.model)
    return f"flashmoe-{kind}" if kind in ("demo", "synth") else engine.path.name


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    t = cfg.task
    engine = state["engine"] = await open_engine(cfg)
    warn_device(engine, log)
    runner = BatchRunner(engine, t.prefill_chunk, t.batch_compute)
    scheduler: Scheduler
    metrics = Metrics(lambda: gauges(engine, scheduler))
    scheduler = Scheduler(runner, t.max_batch, t.max_queue, on_step=metrics.on_step, log=log)
    s = cfg.sampling
    st = ServeState(scheduler, metrics, engine.tokenizer, model_id(cfg, engine),
                    Limits(t.max_prompt_tokens, t.max_tokens_cap),
                    Defaults(s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
                    t.api_key, t.max_body_kb * 1024, _vocab(engine), log, max_context(engine))
    server = _Server(uvicorn.Config(build_app(st), host=t.host, port=t.port, log_config=None,
                                    access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=t.drain_s))
    scheduler.start()
    stop = _on_signals(server, log)
    try:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"flashmoe: serving {st.model} on http://{t.host}:{port} (Ctrl-C stops)",
                  flush=True)
            log.info("server_started", host=t.host, port=port, model=st.model,
                     max_batch=t.max_batch)
        await serving
    finally:
        stop()
        await scheduler.close(cancel=True)
    if not server.started:
        from flashmoe.errors import ConfigError

        raise ConfigError(f"task.host={t.host} task.port={t.port}: could not listen there (in "
                          "use, or not this machine's address); pick another port, or 0 for any")
    note = {"note": SYNTHETIC_NOTE} if model_kind(cfg.model) in ("demo", "synth") else {}
    return run_summary(cfg, engine, None, "ok", **serve_figures(metrics, scheduler), **note)


def serve_figures(m: Metrics, sch: Scheduler) -> dict:
    return {"requests": sum(m.requests.values()),
            "requests_ok": sum(n for (_, code), n in m.requests.items() if code == 200),
            "completion_tokens": m.completion_tokens, "prompt_tokens": m.prompt_tokens,
            "decode_steps": m.decode_steps, "decode_tokens": m.decode_tokens,
            "decode_tok_s": round(m.decode_tokens / m.decode_s, 3) if m.decode_s else 0.0,
            "mean_batch": round(m.decode_tokens / m.decode_steps, 3) if m.decode_steps else 0.0,
            "expert_gb_total": round(m.bytes_read / 1e9, 6),
            "cache_hit_rate": m.gauges()["cache_hit_rate"]}


def _vocab(engine: Engine) -> int:
    cfg = engine.config
    return int(cfg.get("text_config", cfg)["vocab_size"])


def _on_signals(server: uvicorn.Server, log: Any):
    """Ctrl-C/SIGTERM: stop accepting, let in-flight requests finish (task.drain_s);
    a second one exits now. Returns the function that restores the previous handlers."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        log.info("shutdown_requested", signal=sig.name)
        print(f"\nflashmoe: {sig.name}: draining in-flight requests", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)

    def restore() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return restore
