"""Runs one configured task: logging, the summary line, clean errors and Ctrl-C."""
from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flashmoe.config_validate import validate
from flashmoe.config_errors import hydra_failure_message
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.dist import DistError, ExpertParallel
from flashmoe.hardware import detect_machine, picked_line, resolve_hardware
from flashmoe.runtime.backend import Backend, detect, gpu_install_hint
from flashmoe.runtime.logging import close_logging, setup_logging
from flashmoe.tasks.common import run_summary
from flashmoe.tasks.dist import merge_summary, parallel_from

TASKS = {"generate": "flashmoe.tasks.generate", "bench": "flashmoe.tasks.bench",
         "ppl": "flashmoe.tasks.ppl", "serve": "flashmoe.tasks.serve", "pack": "flashmoe.tasks.pack",
         "requant": "flashmoe.tasks.requant", "convert": "flashmoe.tasks.convert"}
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def main(cfg: DictConfig) -> int:
    """Entry for one Hydra job; returns the process exit code."""
    machine = detect_machine() if cfg.hardware.name == "auto" else None
    cfg = resolve_hardware(cfg, machine=machine)
    run_dir = run_dir_of(cfg)
    par = _launched_rank(cfg)
    rank = par.rank if par else 0
    log_file = "flashmoe.jsonl" if rank == 0 else f"flashmoe.rank{rank}.jsonl"
    try:
        log = setup_logging(run_dir, level="debug" if cfg.debug else "info", log_file=log_file)
    except OSError as e:  # run_dir=/read-only/place: nowhere to log to
        print(f"flashmoe: {hydra_failure_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    if par is not None:
        _bind_rank(par)
    if machine is not None:  # printed with the summary line (an error's one line stays one)
        log.info("hardware_picked", profile=cfg.hardware.name, chip=machine.chip,
                 ram_gb=round(machine.ram_gb, 1), gpu=machine.gpu,
                 gpu_memory_gb=machine.gpu_memory_gb, memory_gb=cfg.hardware.memory_gb,
                 cache_budget_gb=cfg.hardware.cache_budget_gb)
    state: dict[str, Any] = {}
    status, code, summary = "error", EXIT_ERROR, None
    backend: Backend | None = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        validate(cfg)
        backend = detect()
        if rank == 0:
            print(start_line(cfg, backend), file=sys.stderr)  # the run's first stderr line
        module = importlib.import_module(TASKS[cfg.task.name])
        summary = asyncio.run(_run(module, cfg, log, state))
        status, code = summary.get("status", "ok"), 0
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
        print("\nflashmoe: interrupted; summary written", file=sys.stderr)
    except FlashMoeError as e:
        who = f"rank {rank}: " if rank and not isinstance(e, DistError) else ""
        print(f"flashmoe: {who}{e}", file=sys.stderr)
        log.error("run_failed", error=str(e), error_type=type(e).__name__)
        if cfg.debug:
            traceback.print_exc()
    except Exception as e:  # a bug of ours: still one line, the traceback in the log
        print(f"flashmoe: internal error ({type(e).__name__}: {e}); the traceback is in "
              f"{run_dir}/flashmoe.jsonl, or run with debug=true", file=sys.stderr)
        log.error("run_failed", error=str(e), error_type=type(e).__name__, exc_info=True)
        if cfg.debug:
            traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if summary is None:
            engine, session = state.get("engine"), state.get("session")
            totals = session.totals if session else engine.totals if engine else None
            summary = run_summary(cfg, engine, totals, status)
        if machine is not None:
            summary["hardware_auto"] = picked_line(cfg, machine)
        if backend is not None:
            summary = {**summary, **backend.summary()}
            if not backend.gpu:
                summary["device"] = "cpu"
        log.info("run_summary", **summary)
        if status != "error" and rank == 0:  # an error's one line is the cause, printed above
            _print_summary(summary, run_dir)
        close_logging()
    if par is not None and status == "error":
        _end_rank(code)  # an MLX thread may sit in a collective that never returns
    return code


def _launched_rank(cfg: DictConfig) -> ExpertParallel | None:
    """This rank (None: one process); a world that cannot form ends the run here."""
    try:
        return parallel_from(cfg)
    except FlashMoeError as e:
        print(f"flashmoe: {e}", file=sys.stderr)
        _end_rank(EXIT_ERROR)
        raise  # not reached


def _bind_rank(par: ExpertParallel) -> None:
    """Every event names its rank; only rank 0 writes text to stdout."""
    import structlog

    structlog.contextvars.bind_contextvars(rank=par.rank, world_size=par.size)
    if par.rank:
        sys.stdout = open(os.devnull, "w")


def _end_rank(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _run(module: Any, cfg: DictConfig, log: Any, state: dict) -> dict:
    stuck = False
    try:
        summary = await module.run(cfg, log, state)
        engine = state.get("engine")
        par = engine.options.parallel if engine is not None else None
        if par is not None:  # rank 0's summary carries every rank's I/O
            summary = await merge_summary(par, engine.evaluated_in_mlx_thread, summary)
        return summary
    except DistError:
        stuck = True  # the MLX thread may never come back: closing it would wait forever
        raise
    finally:
        engine = state.get("engine")
        if engine is not None and not stuck:
            await engine.aclose()


def start_line(cfg: DictConfig, backend: Backend) -> str:
    """`flashmoe: MLX 0.32.4 cuda backend (mlx-cuda-13), device gpu: NVIDIA H200 | hardware=h200`;
    a GPU profile on a build without a GPU adds the command that installs one."""
    if cfg.hardware.device == "gpu" and not backend.gpu:
        return f"flashmoe: {backend.line('cpu')} | {gpu_install_hint(backend, cfg.hardware.name)}"
    return f"flashmoe: {backend.line(cfg.hardware.device)} | hardware={cfg.hardware.name}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_summary(s: dict, run_dir: Path) -> None:
    """The one human line on stderr."""
    parts = [f"status={s['status']}"]
    if "tok_s" in s:
        parts += [f"{s['tok_s']:.2f} tok/s", f"TTFT {s['ttft_s']:.2f}s",
                  f"expert I/O {s['expert_io_ms_per_token']:.1f} ms/token",
                  f"{s.get('expert_gb_total', 0):.3f} GB experts read"]
    for key in ("ppl", "fetch_vs_probe", "requests", "decode_tok_s"):
        if key in s:
            parts.append(f"{key} {s[key]}")
    if "note" in s:
        parts.append(s["note"])
    if "hardware_auto" in s:
        parts.append(s["hardware_auto"])
    print("flashmoe: " + " | ".join(parts) + f" | log {run_dir}/flashmoe.jsonl", file=sys.stderr)
