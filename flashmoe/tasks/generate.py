"""task=generate: stream the generated text to stdout, telemetry to the run log and stderr."""
from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
from omegaconf import DictConfig

from flashmoe.config import model_kind
from flashmoe.errors import ConfigError
from flashmoe.stages.sampling import make_sampler
from flashmoe.tasks.common import (SYNTHETIC_NOTE, max_context, open_engine, run_summary,
                                   warn_device)


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    """Generate; `state` lets the caller summarise an interrupted run."""
    engine = state["engine"] = await open_engine(cfg)
    warn_device(engine, log)
    prompt = engine.encode(cfg.prompt, chat=cfg.chat)
    limit = max_context(engine)
    if limit and len(prompt) + cfg.max_tokens > limit:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + max_tokens={cfg.max_tokens} exceeds the "
                          f"model's context of {limit} tokens; shorten the prompt or lower max_tokens")
    s = cfg.sampling
    mx.random.seed(s.seed)
    sampler = make_sampler(s.temperature, s.top_p, s.top_k, s.min_p)
    detok = engine.tokenizer.detokenizer
    detok.reset()
    stop = set(engine.tokenizer.eos_token_ids or ())
    log.info("generation_started", prompt_tokens=len(prompt), max_tokens=cfg.max_tokens,
             model_path=str(engine.path))
    async for ev in engine.generate(prompt, cfg.max_tokens, sampler, stop=stop):
        log.info("token_sampled", token_id=ev.token_id, position=ev.position, **ev.stats)
        if ev.token_id in stop:
            break
        detok.add_token(ev.token_id)
        sys.stdout.write(detok.last_segment)
        sys.stdout.flush()
    detok.finalize()
    sys.stdout.write(detok.last_segment + "\n")
    sys.stdout.flush()
    note = {"note": SYNTHETIC_NOTE} if model_kind(cfg.model) in ("demo", "synth") else {}
    return run_summary(cfg, engine, engine.totals, "ok", **note)
