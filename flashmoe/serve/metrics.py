"""Server counters and their Prometheus text exposition (format 0.0.4)."""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Callable

WINDOW_S = 5.0  # decode tok/s is averaged over the last few seconds


class Metrics:
    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self.gauges = gauges  # live values: active, queued, pinned slots, cache hit rate
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = self.completion_tokens = 0
        self.decode_tokens = self.decode_steps = self.prefill_tokens = 0
        self.bytes_read = 0
        self.decode_s = 0.0
        self.last_batch = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.started = time.time()

    def on_step(self, report: Any) -> None:
        self.bytes_read += report.stats.bytes_read
        if report.kind == "prefill":
            self.prefill_tokens += report.tokens
            return
        self.decode_steps += 1
        self.decode_tokens += report.tokens
        self.decode_s += report.seconds
        self.last_batch = report.batch
        now = time.monotonic()
        self._recent.append((now, report.tokens))
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def decode_tok_s(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / WINDOW_S

    def on_request(self, endpoint: str, status: int, prompt: int = 0, completion: int = 0) -> None:
        self.requests[(endpoint, status)] += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def render(self) -> str:
        g = self.gauges()
        rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("flashmoe_requests_total", "counter", "HTTP requests answered",
             [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())]),
            ("flashmoe_prompt_tokens_total", "counter", "prompt tokens of answered requests",
             [("", self.prompt_tokens)]),
            ("flashmoe_completion_tokens_total", "counter", "tokens generated for answered requests",
             [("", self.completion_tokens)]),
            ("flashmoe_decode_tokens_total", "counter", "tokens from batched decode steps",
             [("", self.decode_tokens)]),
            ("flashmoe_decode_steps_total", "counter", "batched decode steps", [("", self.decode_steps)]),
            ("flashmoe_decode_tokens_per_second", "gauge", f"decode tok/s over the last {WINDOW_S:g} s",
             [("", round(self.decode_tok_s(), 3))]),
            ("flashmoe_batch_size", "gauge", "sequences in the last decode step", [("", self.last_batch)]),
            ("flashmoe_expert_read_bytes_total", "counter", "expert bytes read from the checkpoint",
             [("", self.bytes_read)]),
        ]
        rows += [(f"flashmoe_{k}", "gauge", k.replace("_", " "), [("", v)]) for k, v in g.items()]
        out = []
        for name, kind, help_, samples in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {value:g}" if isinstance(value, float) else
                    f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"
