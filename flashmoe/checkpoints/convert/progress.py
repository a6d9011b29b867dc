"""A rich progress bar on stderr for one-off tools (stdout stays clean for pipes)."""
from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Steps:
    """Named steps, one bar each; a no-op when disabled."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled,
        )
        self._task: int | None = None

    def __enter__(self) -> Steps:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def start(self, description: str, total: int) -> None:
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        assert self._task is not None, "advance() before start()"
        self._progress.advance(self._task, steps)
