"""task=ppl: perplexity of a text file through the streaming engine, optionally against mlx-lm.

Each window's whole prompt runs exactly through the streaming stages (Session.logits); with
task.reference=mlx_lm the same windows also run through resident mlx-lm, in the engine's MLX
thread, and the summary adds kl_mean (KL(mlx-lm || flashmoe)), top1_agreement and ref_ppl.
See QUALITY.md for the scheme and the numbers.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import aiofiles
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from flashmoe.constants import GIB
from flashmoe.config import model_kind
from flashmoe.engine import DTYPES, Engine, Totals
from flashmoe.errors import CheckpointError, ConfigError
from flashmoe.models.loader import widen_to_f32
from flashmoe.quality import WindowScore, plan_windows, score_window, summarize
from flashmoe.tasks.common import (follower, max_context, open_engine, run_summary,
                                   warn_device)

DEFAULT_DATA = "pydoc_data"  # what the summary's `data` says when data=null
DECODE_ONLY = ("tok_s", "ttft_s", "generated_tokens", "median_token_ms")
RANDOM_NOTE = ("synthetic random weights: ppl is meaningless in absolute terms (of the order "
               "of the vocab size); kl_mean against the reference is the measure")


@dataclass(frozen=True, slots=True)
class Reference:
    """Resident mlx-lm on a checkpoint, with the K it routes to (None: a dense model)."""

    model: nn.Module
    path: Path
    k: int | None


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    """Score every window of `data`; `state` lets the caller summarise an interrupted run."""
    text, source = await read_text(cfg.data)
    engine = state["engine"] = await open_engine(cfg)
    session = state["session"] = engine.session()
    warn_device(engine, log)
    task = cfg.task
    limit = max_context(engine)
    if limit is not None and not 2 <= task.context <= limit:
        raise ConfigError(f"task.context={task.context} must be between 2 and {limit} "
                          "(the model's context)")
    ids = tokenize(engine, text)
    if len(ids) < 2:
        raise ConfigError(f"data={source} is {len(ids)} token(s) long with this model's tokenizer; "
                          "perplexity needs at least 2 tokens of text")
    windows = plan_windows(len(ids), task.context, task.stride, task.max_windows)
    ref = None
    if task.reference == "mlx_lm":
        ref = await load_reference(engine, task.reference_path, task.k_reference, text,
                                   memory_gb=cfg.hardware.memory_gb)
    log.info("ppl_started", data=source, data_tokens=len(ids), windows=len(windows),
             context=task.context, stride=task.stride, reference=task.reference,
             reference_k=ref.k if ref else None, model_path=str(engine.path))
    scores: list[WindowScore] = []
    with _progress(follower(engine)) as bar:
        job = bar.add_task("ppl", total=len(windows), ppl=float("nan"))
        for i, w in enumerate(windows):
            logits = await session.logits(ids[w.begin:w.end])  # accounted as prompt tokens
            ref_logits = await reference_logits(engine, ref, ids[w.begin:w.end],
                                                logits.shape) if ref else None
            scores.append(score_window(w, ids, logits, ref_logits))
            _log_window(log, i, w.begin, scores[-1], ref is not None)
            bar.update(job, advance=1, ppl=summarize(scores)["ppl"])
    result = summarize(scores, reference=ref is not None)
    extra = {"data": source, "data_tokens": len(ids), "context": task.context,
             "stride": task.stride, **_rounded(result), **io_figures(session.totals)}
    if ref is not None:
        extra.update(reference="mlx_lm", reference_k=ref.k, reference_path=str(ref.path),
                     k_reference=task.k_reference)
    if model_kind(cfg.model) in ("demo", "synth"):
        extra["note"] = RANDOM_NOTE
    summary = run_summary(cfg, engine, session.totals, "ok", **extra)
    for key in DECODE_ONLY:  # no token is generated: these would read 0 or mislead
        summary.pop(key, None)
    return summary


async def read_text(data: str | None) -> tuple[str, str]:
    """The text to score and how the summary names it; data=null: CPython's English docs."""
    if data is None:
        from flashmoe.synth.tokenizer import english_text

        text = english_text()
        print(f"flashmoe: data=null: scoring CPython's pydoc_data English ({len(text):,} "
              "characters); data=PATH scores a file", file=sys.stderr)
        return text, DEFAULT_DATA
    path = Path(data).expanduser()
    if not path.is_file():
        raise ConfigError(f"data={data} is not a file; give a UTF-8 text file, or data=null for "
                          "CPython's pydoc_data English")
    try:
        async with aiofiles.open(path, encoding="utf-8") as f:
            text = await f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"data={data} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          "convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise ConfigError(f"data={data} is empty (or only whitespace); perplexity needs text")
    return text, str(path)


def tokenize(engine: Engine, text: str) -> list[int]:
    """The whole text at once; transformers' "longer than the maximum length" warning is moot
    here (windows bound what the model sees), so it is silenced for this call."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return engine.encode(text)
    finally:
        hf_logging.set_verbosity(level)


async def load_reference(engine: Engine, reference_path: str | None, k_reference: str,
                         text: str, memory_gb: float | None = None) -> Reference:
    """mlx-lm resident on the engine's checkpoint (or `reference_path`), in the MLX thread.

    k_reference=full keeps the reference's own K (its config untouched); same routes it to the
    engine's K. The reference follows the engine's activation dtype policy (hardware.dtype).
    """
    path = Path(reference_path).expanduser() if reference_path else engine.path
    config = await _read_config(path)
    size_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / GIB
    if memory_gb is not None and size_gb > memory_gb:  # fail now rather than swap or be killed
        raise ConfigError(f"task.reference=mlx_lm loads {path} whole ({size_gb:.1f} GiB) but "
                          f"hardware.memory_gb={memory_gb}; use task.reference=none, or a smaller "
                          "reference with task.reference_path=DIR")
    text_cfg = config.get("text_config", config)
    k = text_cfg.get("num_experts_per_tok")
    overrides = None
    if k_reference == "same":
        if k is None:
            raise ConfigError(f"task.k_reference=same needs a mixture-of-experts reference, but "
                              f"{path}/config.json has no num_experts_per_tok; use full")
        k = engine.k
        patched = {**text_cfg, "num_experts_per_tok": k}
        overrides = {"text_config": patched} if "text_config" in config else patched
    dtype = DTYPES.get(engine.options.dtype) if engine.options.dtype else None
    model, tokenizer = await engine.in_mlx_thread(_load_mlx_lm, path, overrides, dtype)
    if path != engine.path and list(tokenizer.encode(text[:4096])) != engine.encode(text[:4096]):
        raise ConfigError(f"task.reference_path={reference_path} tokenizes the text differently "
                          f"from {engine.path}; KL needs both models on one tokenizer")
    return Reference(model, path, k)


async def _read_config(path: Path) -> dict:
    try:
        async with aiofiles.open(path / "config.json", encoding="utf-8") as f:
            return json.loads(await f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json cannot be read ({e}); task.reference_path must "
                              "be an mlx-lm checkpoint directory") from None


def _load_mlx_lm(path: Path, overrides: dict | None, dtype: mx.Dtype | None) -> tuple[Any, Any]:
    from mlx_lm import load

    try:
        model, tokenizer = load(str(path), model_config=overrides)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: mlx-lm cannot load this checkpoint as the reference "
                              f"({e}); task.reference=mlx_lm needs it to fit in memory") from None
    # the engine's dtype policy (models/loader.py, Pipeline._embed), so that K and bits are
    # the only differences: f32 widens the bf16/f16 parameters, embeddings come out in dtype
    if dtype == mx.float32:
        widen_to_f32(model)
        mx.eval(model.parameters())
    if dtype is not None:
        _cast_embeddings(model, dtype)
    return model, tokenizer


class _CastEmbedding(nn.Module):
    """mlx-lm's embedding with its output cast, as the engine casts its embeddings."""

    def __init__(self, inner: nn.Module, dtype: mx.Dtype) -> None:
        super().__init__()
        self.inner, self._dtype = inner, dtype

    def __call__(self, ids: mx.array) -> mx.array:
        return self.inner(ids).astype(self._dtype)

    def as_linear(self, x: mx.array) -> mx.array:  # tied heads
        return self.inner.as_linear(x)


def _cast_embeddings(model: nn.Module, dtype: mx.Dtype) -> None:
    modules = dict(model.named_modules())
    for name in [n for n in modules if n.endswith("embed_tokens")]:
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, _CastEmbedding(modules[name], dtype))


async def reference_logits(engine: Engine, ref: Reference, ids: Sequence[int],
                           shape: tuple[int, ...]) -> np.ndarray:
    """mlx-lm's logits for every position of `ids` [L, V] (float32), checked against `shape`."""
    out = await engine.in_mlx_thread(
        lambda: np.array(ref.model(mx.array([list(ids)]))[0].astype(mx.float32)))
    if out.shape != tuple(shape):
        raise CheckpointError(f"the reference {ref.path} gives logits of shape {out.shape}, "
                              f"flashmoe {tuple(shape)}: the vocabularies differ, so KL is "
                              "undefined; use a reference with the same vocab_size")
    return out


def io_figures(t: Totals) -> dict:
    """Expert I/O per prompt token over all windows (token_figures counts decode steps)."""
    n = max(t.prompt_tokens, 1)
    fetch_ms = sum(s.expert_fetch_ms for s in t.steps)
    read = sum(s.bytes_read for s in t.steps)
    return {"expert_io_ms_per_token": round(fetch_ms / n, 3),
            "expert_gb_per_token": round(read / n / 1e9, 6),
            "fetch_gbps": round(read / 1e6 / fetch_ms, 3) if fetch_ms else 0.0}


def _rounded(result: dict) -> dict:
    out = dict(result)
    for key in ("ppl", "ref_ppl", "nll_mean"):
        if key in out:
            out[key] = round(out[key], 6)
    return out


def _log_window(log: Any, index: int, begin: int, s: WindowScore, reference: bool) -> None:
    extra = {}
    if reference:
        extra = {"kl_mean": s.kl_sum / s.tokens, "top1_agreement": s.top1_hits / s.tokens}
    log.info("window_scored", window=index, begin=begin, tokens_scored=s.tokens,
             nll_mean=round(s.nll_sum / s.tokens, 6), **extra)


def _progress(disable: bool = False) -> Progress:
    """Windows done, running ppl and time left, on stderr (stdout stays clean)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("ppl {task.fields[ppl]:.3f}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=disable)
