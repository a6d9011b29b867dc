"""One state object per sequence, and the text it streams out (stop strings held back)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Delta:
    """What a step produced for one sequence: new text, and the finish reason once done."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None


class StopText:
    """Streams text, cutting it at the first stop string; holds back a possible prefix."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(eq=False)
class Sequence:
    """A request's sequence as the scheduler sees it; the runner keeps its cache here."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampler: Any  # SeqSampler
    detokenizer: Any  # mlx-lm streaming detokenizer (a copy per sequence)
    stop_ids: frozenset[int] = frozenset()
    stops: tuple[str, ...] = ()
    cache: Any = None
    prefilled: int = 0  # prompt tokens already through the model
    last: int | None = None  # the token the next decode step feeds
    generated: list[int] = field(default_factory=list)
    steps: int = 0  # decode steps this sequence took part in
    cancelled: bool = False
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_tokens: list[float] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _text: StopText | None = None

    def __post_init__(self) -> None:
        self._text = StopText(self.stops)
        self.detokenizer.reset()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> Delta:
        """Record a sampled token; returns the text to stream and whether it ended."""
        now = time.perf_counter()
        self.t_first = self.t_first or now
        self.t_tokens.append(now)
        self.generated.append(token)
        self.last = token
        if token in self.stop_ids:
            return self._finish("stop", token)
        self.detokenizer.add_token(token)
        text, hit = self._text.feed(self.detokenizer.last_segment)
        if hit:
            self.finish_reason = "stop"
            return Delta(text, token, "stop")
        if len(self.generated) >= self.max_tokens:
            return self._finish("length", token, text)
        return Delta(text, token)

    def _finish(self, reason: str, token: int, text: str = "") -> Delta:
        self.detokenizer.finalize()
        text += self._text.feed(self.detokenizer.last_segment)[0] + self._text.flush()
        self.finish_reason = reason
        return Delta(text, token, reason)

    def end(self, reason: str, error: str | None = None) -> Delta:
        """Cancelled or failed from outside the step."""
        self.finish_reason = reason
        return Delta("", None, reason, error)
