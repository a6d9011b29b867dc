"""One validation step for a composed config: every range and set, refused in one line.

Hydra composes and type-checks (flashmoe.config's schemas); this checks what types cannot say
(ranges, allowed values, keys that must be set) and names the key, the value and what is valid.
"""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from flashmoe.conf_dir import available_options
from flashmoe.config import BASELINES, K_REFERENCES
from flashmoe.constants import (BATCH_COMPUTE, BITS, CACHE_POLICIES, DEVICES, DTYPES, GROUP_SIZES, IO_RETRIES,
                                IO_SPLIT, IO_THREADS, LAYOUTS)
from flashmoe.errors import ConfigError


def _fail(key: str, value: Any, expect: str) -> None:
    raise ConfigError(f"{key}={value} {expect}")


def _between(cfg: DictConfig, key: str, lo: float, hi: float) -> None:
    value = OmegaConf.select(cfg, key)
    if not lo <= value <= hi:
        _fail(key, value, f"must be between {lo} and {hi}")


def _at_least(cfg: DictConfig, key: str, lo: float) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value < lo:
        _fail(key, value, f"must be at least {lo}")


def _one_of(cfg: DictConfig, key: str, allowed: Sequence[Any]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        _fail(key, value, "must be one of " + ", ".join(map(str, allowed)))


def _check_missing(cfg: DictConfig) -> None:
    # hardware first: io/cache interpolate it, so an unresolved `auto` would surface there.
    unset = [f"hardware.{k}" for k in cfg.hardware if OmegaConf.is_missing(cfg.hardware, k)]
    if unset:
        raise ConfigError(
            f"{unset[0]} is unset: hardware=auto must be resolved with "
            "flashmoe.hardware.resolve_hardware(cfg) before use, or choose a profile: "
            "hardware=" + "|".join(o for o in available_options("hardware") if o != "auto"))
    if cfg.model.name == "path" and cfg.model.path is None:
        raise ConfigError("model.path is unset: model=path needs model.path=DIR (a checkpoint directory)")
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(f"{missing[0]} is unset; give it a value, e.g. {missing[0]}=...")


def _validate_model(cfg: DictConfig) -> None:
    _one_of(cfg, "model.bits", BITS)
    for key in ("model.layers", "model.num_experts", "model.vocab_size", "model.experts_per_token"):
        _at_least(cfg, key, 1)
    k = cfg.model.experts_per_token
    n = cfg.model.num_experts  # synth knows its count; a checkpoint's is checked at open
    if k is not None and n is not None and k > n:
        _fail("model.experts_per_token", k, f"must be between 1 and {n} (the model's expert count)")


def _validate_task(cfg: DictConfig) -> None:
    task = cfg.task
    if task.name == "bench":
        _at_least(cfg, "task.tokens", 1)
        _at_least(cfg, "task.warmup", 0)
        _at_least(cfg, "task.repeats", 1)
        _one_of(cfg, "task.baseline", BASELINES)
        _one_of(cfg, "task.check", BASELINES)
        if task.concurrency is not None:
            _between(cfg, "task.concurrency", 1, 256)
        _one_of(cfg, "task.batch_compute", BATCH_COMPUTE)
    elif task.name == "serve":
        _validate_serve(cfg)
    elif task.name == "ppl":
        _at_least(cfg, "task.context", 2)
        _between(cfg, "task.stride", 1, task.context)
        _one_of(cfg, "task.reference", BASELINES)
        _one_of(cfg, "task.k_reference", K_REFERENCES)
        _at_least(cfg, "task.max_windows", 1)
    elif task.name == "requant":
        _one_of(cfg, "task.bits", BITS)
        _one_of(cfg, "task.group_size", GROUP_SIZES)
    elif task.name == "convert":
        _one_of(cfg, "task.source", ("smollm2",))
        _one_of(cfg, "task.variant", ("moe", "dense"))
        _at_least(cfg, "task.experts", 1)
    elif task.name == "pack" and (task.align_bytes < 1 or task.align_bytes & (task.align_bytes - 1)):
        _fail("task.align_bytes", task.align_bytes, "must be a power of two such as 4096")
    for layer, bits in task.get("layer_bits", {}).items():
        if layer < 0 or bits not in BITS:
            _fail(f"task.layer_bits.{layer}", bits, "needs a layer index >= 0 and bits in 2, 3, 4, 8")


def _validate_serve(cfg: DictConfig) -> None:
    _one_of(cfg, "task.batch_compute", BATCH_COMPUTE)
    _between(cfg, "task.port", 0, 65535)
    _between(cfg, "task.max_batch", 1, 256)
    _at_least(cfg, "task.max_queue", 0)
    for key in ("task.max_prompt_tokens", "task.max_tokens_cap", "task.prefill_chunk",
                "task.max_body_kb"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "task.drain_s", 0)
    if cfg.task.api_key is not None and not str(cfg.task.api_key).strip():
        _fail("task.api_key", "''", "must be a non-empty string, or null for no key")


def validate(cfg: DictConfig) -> None:
    """The one validation step: ranges and sets Hydra's types cannot express; raise
    ConfigError naming the key. Limits only a checkpoint knows (its expert count, its
    context) are checked when it is opened, and named by config_error()."""
    _check_missing(cfg)
    _one_of(cfg, "hardware.device", DEVICES)
    _one_of(cfg, "hardware.dtype", DTYPES)
    _at_least(cfg, "hardware.memory_gb", 0.001)
    _at_least(cfg, "hardware.cache_budget_gb", 0)
    _between(cfg, "io.split", *IO_SPLIT)
    _between(cfg, "io.threads", *IO_THREADS)
    _between(cfg, "io.retries", *IO_RETRIES)
    _one_of(cfg, "io.layout", LAYOUTS)
    _one_of(cfg, "cache.policy", CACHE_POLICIES)
    _at_least(cfg, "cache.budget_gb", 0)
    _at_least(cfg, "cache.host_budget_gb", 0)
    _at_least(cfg, "cache.clean_ahead", 0)
    if cfg.cache.budget_gb > cfg.hardware.memory_gb:
        _fail("cache.budget_gb", cfg.cache.budget_gb,
              f"must not exceed hardware.memory_gb={cfg.hardware.memory_gb}")
    _at_least(cfg, "sampling.temperature", 0)
    if not 0 < cfg.sampling.top_p <= 1:
        _fail("sampling.top_p", cfg.sampling.top_p, "must be in (0, 1]; 1 disables top-p")
    _at_least(cfg, "sampling.top_k", 0)
    if not 0 <= cfg.sampling.min_p < 1:
        _fail("sampling.min_p", cfg.sampling.min_p, "must be in [0, 1); 0 disables min-p")
    _at_least(cfg, "sampling.seed", 0)
    _at_least(cfg, "max_tokens", 1)
    _validate_model(cfg)
    _validate_task(cfg)
    _validate_dist(cfg)


def _validate_dist(cfg: DictConfig) -> None:
    from flashmoe.runtime.dist import BACKENDS, STRATEGIES

    if cfg.get("dist") is None:
        return
    _one_of(cfg, "dist.strategy", STRATEGIES)
    _one_of(cfg, "dist.backend", BACKENDS)
    _at_least(cfg, "dist.timeout_s", 1)
    _at_least(cfg, "dist.connect_timeout_s", 1)
