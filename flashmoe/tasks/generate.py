"""task=generate: stream the generated text to stdout, telemetry to the run log and stderr."""
from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
from omegaconf import DictConfig

from flashmoe.chat import chat_ids, has_chat_template
from flashmoe.config import model_kind
from flashmoe.engine import Engine
from flashmoe.errors import ConfigError
from flashmoe.prompts import resolve_prompt
from flashmoe.stages.sampling import make_sampler
from flashmoe.tasks.common import (SYNTHETIC_NOTE, max_context, open_engine, run_summary,
                                   warn_device)


async def run(cfg: DictConfig, log: Any, state: dict) -> dict:
    """Generate (or chat, on a terminal); `state` lets the caller summarise an interrupted run."""
    source = resolve_prompt(cfg)  # a missing prompt_file fails before the model loads
    engine = state["engine"] = await open_engine(cfg, prompt_text=source.text)
    warn_device(engine, log)
    s = cfg.sampling
    mx.random.seed(s.seed)
    sampler = make_sampler(s.temperature, s.top_p, s.top_k, s.min_p)
    if source.text is None:
        from flashmoe.tasks.chat import chat

        return await chat(cfg, engine, sampler, log)
    prompt = encode_prompt(engine, source.text, cfg)
    limit = max_context(engine)
    if limit and len(prompt) + cfg.max_tokens > limit:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + max_tokens={cfg.max_tokens} exceeds the "
                          f"model's context of {limit} tokens; shorten the prompt or lower max_tokens")
    detok = engine.tokenizer.detokenizer
    detok.reset()
    stop = set(engine.tokenizer.eos_token_ids or ())
    log.info("generation_started", prompt_tokens=len(prompt), max_tokens=cfg.max_tokens,
             model_path=str(engine.path), prompt_origin=source.origin, prompt_token_ids=prompt)
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


def encode_prompt(engine: Engine, text: str, cfg: DictConfig) -> list[int]:
    """The prompt's ids: the chat template with chat=true or a system message, else the text."""
    if (cfg.chat or cfg.system is not None) and has_chat_template(engine.tokenizer):
        return chat_ids(engine.tokenizer, text, cfg.system)
    if cfg.system is not None:
        raise ConfigError(f"system= needs a chat template and {engine.path} has none; drop "
                          "system= (and chat=true) or put the instructions in the prompt")
    return engine.encode(text)
