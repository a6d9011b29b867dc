"""structlog setup: JSON lines into the run dir, a concise console on stderr for people.

Events go through stdlib logging (logger "flashmoe", not propagated to Hydra's root handlers),
so switching run dirs is a handler swap: loggers created earlier follow the new file.
stdout stays reserved for generated text.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional, Union

import structlog

from flashmoe.errors import ConfigError

LOGGER_NAME = "flashmoe"
LOG_FILE = "flashmoe.jsonl"
LEVELS = ("debug", "info", "warning", "error", "critical")


def _stdlib_logger(*args: Any) -> logging.Logger:
    # Every structlog logger lands under "flashmoe", whatever name its caller gave (or "__main__").
    name = str(args[0]) if args and args[0] else LOGGER_NAME
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
    ]


def _drop_for_console(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # People read the console; the file keeps the full record.
    for key in ("timestamp", "logger", "run_id"):
        event.pop(key, None)
    return event


def _numeric_level(level: Union[str, int]) -> int:
    if isinstance(level, int):
        return level
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level={level} must be one of {', '.join(LEVELS)}")
    return logging.getLevelName(level.upper())


def _file_handler(path: Path, level: int) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(default=str),  # Path, numpy scalars: as text
        ],
    ))
    return handler


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (pytest and rich swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


# Events the app already tells the person in its own words (one line per error; the start
# line names the device and how to get the GPU build).
SILENT_ON_CONSOLE = frozenset({"run_failed", "device_unavailable"})


def _not_silent(record: logging.LogRecord) -> bool:
    msg = record.msg
    return not (isinstance(msg, dict) and msg.get("event") in SILENT_ON_CONSOLE)


def _console_handler(level: int) -> logging.Handler:
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.addFilter(_not_silent)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_for_console,
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(),
                exception_formatter=structlog.dev.RichTracebackFormatter(
                    color_system="auto", show_locals=False),
            ),
        ],
    ))
    return handler


def setup_logging(
    run_dir: Path,
    *,
    console: bool = True,
    level: Union[str, int] = "info",
    console_level: Union[str, int] = "warning",
    run_id: Optional[str] = None,
) -> structlog.stdlib.BoundLogger:
    """Log to `run_dir/flashmoe.jsonl` (one JSON object per line) and, from console_level up,
    to stderr. Safe to call again: the previous file is closed and events follow the new one.

    Binds run_id (default: "<date>/<time>" from the run dir) in contextvars; bind more with
    structlog.contextvars.bind_contextvars(layer=..., token=...).
    """
    close_logging()
    numeric = _numeric_level(level)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=_stdlib_logger,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # a cached logger would pin a closed configuration
    )
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(numeric)
    root.propagate = False  # Hydra's job log (plain text) must not get these events twice
    root.addHandler(_file_handler(run_dir / LOG_FILE, numeric))
    if console:
        root.addHandler(_console_handler(max(numeric, _numeric_level(console_level))))
    structlog.contextvars.bind_contextvars(run_id=run_id or f"{run_dir.parent.name}/{run_dir.name}")
    return structlog.stdlib.get_logger(LOGGER_NAME)


def close_logging() -> None:
    """Flush and close flashmoe's handlers and clear the bound context; idempotent.

    Afterwards warnings still reach stderr (nothing reaches a file) until the next setup.
    """
    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if structlog.is_configured():
        root.addHandler(_console_handler(logging.WARNING))
    structlog.contextvars.clear_contextvars()
