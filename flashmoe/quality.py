"""Measuring quality from logits: strided windows, NLL/perplexity, KL and top-1 agreement.

Pure numpy in float64 (no MLX, no I/O), so the same functions score flashmoe, mlx-lm or any
array a test makes up. Conventions: `logits` rows are positions of one window [L, V]; row j
predicts token j + 1 of the window. KL is KL(P_ref || P_flashmoe) = sum P_ref (log P_ref - log P),
the extra nats per token that flashmoe's distribution costs a coder built on the reference's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from flashmoe.errors import ConfigError

ROW_BLOCK = 64  # rows per float64 block: bounds temporaries at 64 x V x 8 bytes


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens [begin, end) go in; targets [score_from, end) are scored (score_from > begin)."""

    begin: int
    end: int
    score_from: int

    @property
    def rows(self) -> slice:
        """The logit rows (window positions) that predict the scored targets."""
        return slice(self.score_from - 1 - self.begin, self.end - 1 - self.begin)

    @property
    def scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True, slots=True)
class WindowScore:
    """Sums over one window's scored targets (ref_* and kl/top1 are 0 without a reference)."""

    tokens: int
    nll_sum: float
    ref_nll_sum: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_hits: int = 0


def plan_windows(n_tokens: int, context: int, stride: int,
                 max_windows: int | None = None) -> list[Window]:
    """The strided scheme of Hugging Face's perplexity guide.

    Windows start every `stride` tokens and hold up to `context`; each scores only targets the
    previous window did not. Every target needs at least one token before it in its window,
    so the first window skips token 0, and with stride == context (no overlap) each window's
    first token goes unscored as well.
    """
    if n_tokens < 2:
        raise ConfigError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if context < 2:
        raise ConfigError(f"task.context={context} must be at least 2")
    if not 1 <= stride <= context:
        raise ConfigError(f"task.stride={stride} must be between 1 and task.context={context}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"task.max_windows={max_windows} must be at least 1 (or null: all)")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(windows) == max_windows):
            break
    return windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log P(target) per row of logits [N, V] (float64 [N])."""
    t = np.asarray(targets, dtype=np.int64)
    assert logits.shape[0] == t.shape[0], (logits.shape, t.shape)
    out = np.empty(t.shape[0], dtype=np.float64)
    for a in range(0, t.shape[0], ROW_BLOCK):
        lp = log_softmax(logits[a:a + ROW_BLOCK])
        out[a:a + ROW_BLOCK] = -lp[np.arange(lp.shape[0]), t[a:a + ROW_BLOCK]]
    return out


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per row, in nats (float64 [N]); clipped at 0 against rounding."""
    assert ref_logits.shape == logits.shape, (ref_logits.shape, logits.shape)
    out = np.empty(logits.shape[0], dtype=np.float64)
    for a in range(0, logits.shape[0], ROW_BLOCK):
        lr, lq = log_softmax(ref_logits[a:a + ROW_BLOCK]), log_softmax(logits[a:a + ROW_BLOCK])
        out[a:a + ROW_BLOCK] = (np.exp(lr) * (lr - lq)).sum(axis=-1)
    return np.maximum(out, 0.0)


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Whether the two argmaxes agree, per row (bool [N])."""
    return np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)


def score_window(window: Window, ids: Sequence[int], logits: np.ndarray,
                 ref_logits: np.ndarray | None = None) -> WindowScore:
    """Score one window: `ids` are all the text's tokens, logits [end - begin, V] the window's."""
    assert logits.shape[0] == window.end - window.begin, (logits.shape, window)
    targets = np.asarray(ids[window.score_from:window.end], dtype=np.int64)
    rows = logits[window.rows]
    nll_sum = float(nll(rows, targets).sum())
    if ref_logits is None:
        return WindowScore(window.scored, nll_sum)
    ref = ref_logits[window.rows]
    kl = kl_divergence(ref, rows)
    return WindowScore(window.scored, nll_sum, float(nll(ref, targets).sum()), float(kl.sum()),
                       float(kl.max()), int(top1_agreement(ref, rows).sum()))


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL); inf when the mean overflows."""
    if tokens < 1:
        raise ValueError("perplexity of zero scored tokens")
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def summarize(scores: Iterable[WindowScore], reference: bool = False) -> dict:
    """ppl and tokens_scored; with a reference also ref_ppl, kl_mean, kl_max, top1_agreement."""
    scores = list(scores)
    n = sum(s.tokens for s in scores)
    out = {"ppl": perplexity(sum(s.nll_sum for s in scores), n), "tokens_scored": n,
           "windows": len(scores), "nll_mean": sum(s.nll_sum for s in scores) / n}
    if reference:
        out.update(ref_ppl=perplexity(sum(s.ref_nll_sum for s in scores), n),
                   kl_mean=sum(s.kl_sum for s in scores) / n,
                   kl_max=max(s.kl_max for s in scores),
                   top1_agreement=sum(s.top1_hits for s in scores) / n)
    return out
