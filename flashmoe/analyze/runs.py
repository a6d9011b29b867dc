"""Find and read the runs Hydra left on disk: run dirs, multirun sweep dirs, or parents of both."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flashmoe.errors import FlashMoeError

LOG_NAME = "flashmoe.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"
CONFIG = Path(".hydra") / "config.yaml"
SUMMARY_EVENT = "run_summary"
TOKEN_EVENT = "token_sampled"


class AnalyzeError(FlashMoeError):
    """The path given to `python -m flashmoe.analyze` holds no readable runs."""


@dataclass(frozen=True, slots=True)
class Run:
    """One Hydra run directory as read from disk (summaries in file order, one per repeat)."""

    path: Path
    name: str  # path relative to the analyzed PATH, for people
    overrides: dict[str, str]  # "io.split" -> "4", in command-line order
    config: dict[str, Any]  # .hydra/config.yaml, unresolved; fallback for keys not overridden
    summaries: tuple[dict[str, Any], ...]
    tokens: int  # token_sampled events seen
    has_log: bool
    warnings: tuple[str, ...]

    def setting(self, key: str) -> str | None:
        """The value this run used for a dotted config key: its override, else its config."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        # A whole group (e.g. hardware: {...}) has no one-word value to show.
        return None if isinstance(node, (dict, list)) else str(node)


def load_runs(path: str | os.PathLike[str]) -> list[Run]:
    """Every run under `path` (a run dir, a sweep dir, or a parent of several), sorted by name."""
    root = Path(path)
    if not root.exists():
        raise AnalyzeError(
            f"{root} does not exist; give a Hydra run dir (runs/DATE/TIME), a sweep dir "
            f"(runs/multirun/DATE_TIME) or a folder that contains them"
        )
    if root.is_file() and root.name == LOG_NAME:
        root = root.parent
    if not root.is_dir():
        raise AnalyzeError(f"{root} is a file, not a directory; give the run or sweep directory")
    dirs = find_run_dirs(root)
    if not dirs:
        raise AnalyzeError(
            f"no runs found under {root}: expected directories holding {LOG_NAME} and/or "
            f"{OVERRIDES} (a Hydra run dir, or a sweep dir with numbered subdirs 0/, 1/, ...)"
        )
    return [read_run(d, root) for d in dirs]


def find_run_dirs(root: Path) -> list[Path]:
    """Directories that look like a Hydra run: they hold the log or a .hydra/overrides.yaml."""
    found = []
    for here, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        base = Path(here)
        if LOG_NAME in files or (base / OVERRIDES).is_file():
            found.append(base)
    return sorted(found, key=_natural_path_key)


def read_run(run_dir: Path, root: Path) -> Run:
    """Read one run dir; problems become warnings so one bad run never hides the others."""
    warnings: list[str] = []
    overrides = read_overrides(run_dir / OVERRIDES, warnings)
    config = _read_yaml(run_dir / CONFIG, warnings)
    log = run_dir / LOG_NAME
    summaries: list[dict[str, Any]] = []
    tokens = 0
    if log.is_file():
        events, bad, first_bad = read_events(log)
        if bad:
            warnings.append(f"skipped {bad} malformed line(s) in {log} (first at line {first_bad})")
        summaries = [e for e in events if e["event"] == SUMMARY_EVENT]
        tokens = sum(1 for e in events if e["event"] == TOKEN_EVENT)
    name = run_dir.relative_to(root).as_posix()
    return Run(
        path=run_dir,
        name=run_dir.name if name == "." else name,
        overrides=overrides,
        config=config if isinstance(config, dict) else {},
        summaries=tuple(summaries),
        tokens=tokens,
        has_log=log.is_file(),
        warnings=tuple(warnings),
    )


def read_events(log: Path) -> tuple[list[dict[str, Any]], int, int]:
    """Parse a structlog JSON-lines file: (events, malformed line count, first bad line number)."""
    events: list[dict[str, Any]] = []
    bad, first_bad = 0, 0
    with log.open("r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            # A truncated last line (a run killed mid-write) lands here too.
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                bad += 1
                first_bad = first_bad or number
                continue
            events.append(event)
    return events, bad, first_bad


def read_overrides(path: Path, warnings: list[str]) -> dict[str, str]:
    """Hydra's override list (["task=bench", "+io.split=4"]) as an ordered key -> value dict."""
    items = _read_yaml(path, warnings)
    if items is None:
        return {}
    if not isinstance(items, list):
        warnings.append(f"ignored {path}: expected a YAML list of key=value strings")
        return {}
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")  # Hydra's append / force / delete prefixes
        if sep and key and not key.startswith("hydra."):
            out[key] = value
    return out


def _read_yaml(path: Path, warnings: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        warnings.append(f"ignored {path}: not valid YAML ({type(e).__name__})")
        return None


def _natural_path_key(p: Path) -> tuple[tuple[int, int, str], ...]:
    # Sweep subdirs 0..10 sort as numbers, not as 0, 1, 10, 2.
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts)
