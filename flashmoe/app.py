"""Runs one configured task: logging, the summary line, clean errors and Ctrl-C."""
from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flashmoe.config import validate
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.hardware import resolve_hardware
from flashmoe.runtime.logging import close_logging, setup_logging
from flashmoe.tasks.common import run_summary

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
    cfg = resolve_hardware(cfg)
    run_dir = run_dir_of(cfg)
    log = setup_logging(run_dir, level="debug" if cfg.debug else "info")
    state: dict[str, Any] = {}
    status, code, summary = "error", EXIT_ERROR, None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        validate(cfg)
        module = importlib.import_module(TASKS[cfg.task.name])
        summary = asyncio.run(_run(module, cfg, log, state))
        status, code = summary.get("status", "ok"), 0
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
        print("\nflashmoe: interrupted; summary written", file=sys.stderr)
    except FlashMoeError as e:
        print(f"flashmoe: {e}", file=sys.stderr)
        log.error("run_failed", error=str(e), error_type=type(e).__name__)
        if cfg.debug:
            raise
    except Exception as e:  # a bug of ours: still one line, the traceback in the log
        print(f"flashmoe: internal error ({type(e).__name__}: {e}); the traceback is in "
              f"{run_dir}/flashmoe.jsonl, or run with debug=true", file=sys.stderr)
        log.error("run_failed", error=str(e), error_type=type(e).__name__, exc_info=True)
        if cfg.debug:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if summary is None:
            engine = state.get("engine")
            summary = run_summary(cfg, engine, engine.totals if engine else None, status)
        log.info("run_summary", **summary)
        if status != "error":  # an error's one line is the cause, printed above
            _print_summary(summary, run_dir)
        close_logging()
    return code


async def _run(module: Any, cfg: DictConfig, log: Any, state: dict) -> dict:
    try:
        return await module.run(cfg, log, state)
    finally:
        engine = state.get("engine")
        if engine is not None:
            await engine.aclose()


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
    print("flashmoe: " + " | ".join(parts) + f" | log {run_dir}/flashmoe.jsonl", file=sys.stderr)
