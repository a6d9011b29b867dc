"""What every task does: find the checkpoint, open the engine from config, summarise the run."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flashmoe.config import model_kind
from flashmoe.config_errors import config_error
from flashmoe.engine import Engine, EngineOptions, Totals
from flashmoe.errors import CheckpointError, OptionError
from flashmoe.runtime.memory import peak_rss_gb

SYNTHETIC_NOTE = "synthetic random weights: the text is gibberish by design"


def checkpoint_path(cfg: DictConfig) -> Path:
    """The checkpoint directory the config names, building demo/synth ones on first use."""
    kind = model_kind(cfg.model)
    if kind == "path":
        path = Path(cfg.model.path).expanduser()
        if not path.exists():
            raise CheckpointError(f"model.path={cfg.model.path} does not exist; give the directory "
                                  "of a downloaded mlx-community checkpoint (config.json + *.safetensors)")
        return path
    if kind == "synth":
        from flashmoe.synth.shaped import shaped_checkpoint

        # the checkpoint keeps the real model's own K (10); model.experts_per_token
        # lowers it at run time, so K sweeps share one checkpoint
        m = cfg.model
        return shaped_checkpoint(m.layers or 4, 10, m.bits, m.vocab_size or 248320,
                                 m.num_experts or 512, cache_dir=m.path)
    from flashmoe.synth.demo import demo_checkpoint

    return demo_checkpoint()


def engine_options(cfg: DictConfig, prompt_text: str | None = None,
                   **extra: Any) -> EngineOptions:
    """The validated config (app.main ran config_validate.validate) mapped onto EngineOptions.

    prompt_text: a prompt that came from stdin or a file, which several ranks must agree on
    as they agree on the config."""
    from flashmoe.tasks.dist import parallel_from, run_context

    dtype = cfg.hardware.dtype
    if cfg.hardware.device == "gpu" and not gpu_available():
        dtype = "float32"  # the CPU fallback: bf16 activations are ~9x slower there
    par = parallel_from(cfg)
    if par is not None:
        extra = {"parallel": par, "run_context": run_context(cfg, prompt_text), **extra}
    return EngineOptions(
        experts_per_token=cfg.model.experts_per_token, io_split=cfg.io.split,
        io_threads=cfg.io.threads, io_retries=cfg.io.retries, io_direct=cfg.io.direct,
        io_verify=cfg.io.verify, io_readahead=cfg.io.readahead, cuda_copy=cfg.io.cuda_copy,
        layout=cfg.io.layout,
        cache_policy=cfg.cache.policy,
        prefetch=cfg.cache.prefetch,
        cache_budget_gb=cfg.cache.budget_gb, cache_host_budget_gb=cfg.cache.host_budget_gb,
        cache_clean_ahead=cfg.cache.clean_ahead,
        device=cfg.hardware.device,
        dtype=dtype, **extra)


def gpu_available() -> bool:
    import mlx.core as mx

    return bool(mx.is_available(mx.gpu))


async def open_engine(cfg: DictConfig, prompt_text: str | None = None, **extra: Any) -> Engine:
    """Open the streaming engine on the (validated) config; the engine's checks against the
    checkpoint come back named by config key."""
    path = checkpoint_path(cfg)
    try:
        return await Engine.open(path, engine_options(cfg, prompt_text, **extra))
    except OptionError as e:
        raise config_error(e) from None


def warn_device(engine: Engine, log: Any) -> None:
    if engine.requested_device != engine.device:
        log.warning("device_unavailable", requested=engine.requested_device, using=engine.device,
                    dtype=engine.options.dtype,
                    hint="this MLX build has no GPU backend; running on the CPU in float32 "
                    "(the run's first stderr line says how to install the GPU build)")


def follower(engine: Engine) -> bool:
    """A rank other than 0 of several: it draws no progress bars (rank 0 speaks for all)."""
    par = engine.options.parallel
    return par is not None and par.rank != 0


def max_context(engine: Engine) -> int | None:
    cfg = engine.config
    return (cfg.get("text_config", cfg)).get("max_position_embeddings")


def run_summary(cfg: DictConfig, engine: Engine | None, totals: Totals | None,
                status: str, **extra: Any) -> dict:
    """The run_summary event: the key names are a contract (README "Log keys")."""
    out: dict[str, Any] = {
        "status": status, "hardware": cfg.hardware.name, "io_split": cfg.io.split,
        "io_threads": cfg.io.threads, "cache_policy": cfg.cache.policy,
        "experts_per_token": engine.k if engine else cfg.model.experts_per_token,
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "device": engine.device if engine else cfg.hardware.device,
    }
    if engine is not None and totals is not None:
        out.update(token_figures(totals))
        hits, misses = engine.cache_stats()
        out["cache_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else 0.0
        host = engine.host_hits()
        if engine.options.cache_host_budget_gb:  # per tier: of all lookups, served by each
            total = hits + misses + host
            out["host_hit_rate"] = round(host / total, 4) if total else 0.0
            out["device_hit_rate"] = round(hits / total, 4) if total else 0.0
        out["model_path"] = str(engine.path)
        out["model_type"] = engine.config.get("model_type")
        out["slot_gb"] = round(engine.slot_bytes / 1e9, 3)
    if engine is not None and engine.options.cache_host_budget_gb:  # bench's too (no totals)
        (out["host_demotions_copied"], out["host_demotions_kept"],
         out["host_stashed"]) = engine.host_demotions()
    out.update(extra)
    return out


def token_figures(t: Totals) -> dict:
    """tok/s over decode steps; TTFT is the prompt pass plus the first sample."""
    decode = t.steps[1:] if t.steps else []
    n = max(t.decode_tokens, 1)
    fetch_ms = sum(s.expert_fetch_ms for s in decode)
    read = sum(s.bytes_read for s in decode)
    per_tok = [sum(s.as_dict()[k] for k in STAGE_KEYS) for s in decode]
    return {
        "tok_s": round(t.decode_tokens / t.decode_s, 3) if t.decode_s else 0.0,
        "ttft_s": round(t.prompt_s, 4),
        "prompt_tokens": t.prompt_tokens,
        "generated_tokens": t.decode_tokens + (1 if t.prompt_tokens else 0),
        "prompt_tok_s": round(t.prompt_tokens / t.prompt_s, 3) if t.prompt_s else 0.0,
        "expert_io_ms_per_token": round(fetch_ms / n, 3),
        "expert_gb_per_token": round(read / n / 1e9, 6),
        "expert_gb_total": round(sum(s.bytes_read for s in t.steps) / 1e9, 6),
        "fetch_gbps": round(read / 1e6 / fetch_ms, 3) if fetch_ms else 0.0,
        "median_token_ms": round(statistics.median(per_tok), 3) if per_tok else 0.0,
        **prefetch_figures(decode), **allreduce_figures(decode, n),
    }


def allreduce_figures(steps: list, n: int) -> dict:
    """Several ranks: time in the per-layer all_sum (waiting for the slowest rank included)."""
    if not any("allreduce_ms" in s.extra for s in steps):
        return {}
    return {"allreduce_ms_per_token": round(sum(s.extra.get("allreduce_ms", 0.0)
                                                for s in steps) / n, 3)}


def prefetch_figures(steps: list) -> dict:
    """Share of the experts a layer needed that the speculative read had guessed."""
    needed = sum(s.extra.get("prefetch_needed", 0) for s in steps)
    if not needed:
        return {}
    hits = sum(s.extra.get("prefetch_hits", 0) for s in steps)
    issued = sum(s.extra.get("prefetch_issued", 0) for s in steps)
    return {"prefetch_accuracy": round(hits / needed, 4), "prefetch_issued": issued}


STAGE_KEYS = ("device_trip_ms", "route_host_ms", "expert_fetch_ms", "expert_compute_ms",
              "sampling_ms")
