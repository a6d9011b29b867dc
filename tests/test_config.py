"""Configuration layer: every hardware x task composes and validates; errors name the key."""
from __future__ import annotations

import itertools
import json
import logging
import platform
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flashmoe.conf_dir import available_options, conf_dir
from flashmoe.config import compose_config, hydra_error_message, model_kind
from flashmoe.config_validate import validate
from flashmoe.errors import ConfigError
from flashmoe.hardware import cuda_available, detect_profile, load_profile, resolve_hardware
from flashmoe.runtime.logging import LOG_FILE, close_logging, setup_logging
from flashmoe.runtime.memory import RssSampler, current_rss_gb, peak_rss_gb, total_memory_gb

HARDWARE = ["auto", "h200", "linux_cpu", "m3max", "m4pro", "m5max"]
TASKS = ["bench", "convert", "generate", "pack", "ppl", "requant", "serve"]


def _ok(*overrides: str):
    cfg = resolve_hardware(compose_config(overrides), profile="linux_cpu")
    validate(cfg)
    return cfg


def test_groups_ship_the_expected_options() -> None:
    assert available_options("hardware") == HARDWARE
    assert available_options("task") == TASKS
    assert available_options("model") == ["demo", "path", "synth"]


def test_every_hardware_and_task_composes_and_validates() -> None:
    # One Hydra initialisation for all 36 compositions: each compose costs ~0.2 s here.
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for hw, task in itertools.product(HARDWARE, TASKS):
            cfg = resolve_hardware(compose("config", overrides=[f"hardware={hw}", f"task={task}"]))
            validate(cfg)
            assert cfg.task.name == task
            assert hw == "auto" or cfg.hardware.name == hw
            assert cfg.io.split == cfg.hardware.io_split and cfg.io.threads == cfg.hardware.io_threads
            assert cfg.io.direct == cfg.hardware.io_direct == (cfg.hardware.name == "linux_cpu")
            assert cfg.cache.budget_gb == cfg.hardware.cache_budget_gb
            OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation


def test_other_group_options_compose() -> None:
    for override in ["model=synth", "model=path model.path=/ckpt", "cache=none", "cache=lfu",
                     "sampling=qwen", "io.direct=true cache.prefetch=true chat=true debug=true"]:
        _ok("hardware=m3max", *override.split())


def test_m5max_with_split_override() -> None:
    cfg = _ok("hardware=m5max", "io.split=4")
    assert cfg.io.split == 4
    assert cfg.io.threads == load_profile("m5max").io_threads == 16


def test_auto_resolves_and_keeps_user_overrides() -> None:
    cfg = compose_config(["hardware.io_threads=3"])
    with pytest.raises(ConfigError, match="resolve_hardware"):
        validate(cfg)  # unresolved auto is reported, not a KeyError deep inside
    resolved = resolve_hardware(cfg, profile="linux_cpu")
    validate(resolved)
    assert resolved.hardware.name == "linux_cpu"
    assert resolved.io.threads == 3  # the user's value, not the profile's 4
    profile = load_profile("linux_cpu")
    assert resolved.io.split == profile.io_split and resolved.hardware.dtype == profile.dtype
    assert resolved.io.direct is True  # linux_cpu reads experts O_DIRECT (BENCHMARKS.md i)
    assert resolve_hardware(compose_config(["io.direct=false"]), profile="linux_cpu").io.direct is False
    assert cfg.hardware.name == "auto"  # the input is left alone


@pytest.mark.skipif(platform.system() != "Linux" or cuda_available(), reason="the CPU dev machine")
def test_detect_profile_on_this_machine() -> None:
    assert detect_profile() == "linux_cpu"


def test_auto_scales_the_profile_to_the_machine() -> None:
    from flashmoe.hardware import Machine, picked_line

    gpu = Machine("Linux", "x86_64", "AMD EPYC", 128.0, "NVIDIA H200", 139.8)
    cfg = resolve_hardware(compose_config([]), machine=gpu)
    validate(cfg)
    h200 = load_profile("h200")
    assert cfg.hardware.name == "h200" and cfg.hardware.memory_gb == 139.8
    assert cfg.hardware.cache_budget_gb == round(139.8 * h200.cache_budget_gb / h200.memory_gb, 1)
    assert "picked h200 for AMD EPYC (NVIDIA H200, 140 GiB GPU memory" in picked_line(cfg, gpu)
    cpu = Machine("Linux", "x86_64", "AMD EPYC", 24.0)
    for override, shown in (([], "io.direct=true"), (["io.direct=false"], "io.direct=false")):
        assert shown in picked_line(resolve_hardware(compose_config(override), machine=cpu), cpu)
    mac = Machine("Darwin", "arm64", "Apple M4 Pro", 64.0)
    cfg = resolve_hardware(compose_config(["hardware.memory_gb=32"]), machine=mac)
    assert cfg.hardware.name == "m4pro"  # the chip, not the RAM (64 would say m3max)
    assert cfg.hardware.memory_gb == 32 and cfg.hardware.cache_budget_gb == round(32 * 4 / 24, 1)


@pytest.mark.parametrize("system,machine,memory,cuda,expected", [
    ("Darwin", "arm64", 24, False, "m4pro"), ("Darwin", "arm64", 32, False, "m4pro"),
    ("Darwin", "arm64", 48, False, "m3max"), ("Darwin", "arm64", 128, False, "m5max"),
    ("Linux", "x86_64", 2000, True, "h200"), ("Linux", "x86_64", 24, False, "linux_cpu"),
    ("Darwin", "x86_64", 16, False, "linux_cpu"),
])
def test_detect_profile_rules(system: str, machine: str, memory: float, cuda: bool, expected: str) -> None:
    assert detect_profile(system=system, machine=machine, memory_gb=memory, cuda=cuda) == expected


def test_load_profile_rejects_auto_and_unknown() -> None:
    assert load_profile("m3max").ssd_gbps == 17.5
    for name in ("auto", "nope"):
        with pytest.raises(ConfigError, match="m3max"):
            load_profile(name)


@pytest.mark.parametrize("override,message", [
    ("io.split=0", "io.split=0 must be between 1 and 64"),
    ("io.split=65", "io.split=65 must be between 1 and 64"),
    ("io.threads=0", "io.threads=0"),
    ("io.retries=101", "io.retries=101"),
    ("cache.budget_gb=-1", "cache.budget_gb=-1.0"),
    ("cache.budget_gb=99", "hardware.memory_gb=24"),
    ("cache.clean_ahead=-1", "cache.clean_ahead=-1"),
    ("cache.policy=fifo", "cache.policy=fifo must be one of none, lru, lfu"),
    ("sampling.temperature=-0.1", "sampling.temperature"),
    ("sampling.top_p=0", "sampling.top_p"), ("sampling.top_p=1.5", "sampling.top_p"),
    ("sampling.top_k=-1", "sampling.top_k"), ("sampling.min_p=1", "sampling.min_p"),
    ("max_tokens=0", "max_tokens=0"),
    ("hardware.dtype=float8", "hardware.dtype=float8"), ("hardware.device=tpu", "hardware.device"),
    ("model.bits=5", "model.bits=5"), ("model.experts_per_token=0", "model.experts_per_token=0"),
    ("model=path", "model.path"),
    ("task=bench task.tokens=0", "task.tokens=0"), ("task=bench task.baseline=vllm", "task.baseline"),
    ("task=ppl task.context=1", "task.context=1"), ("task=ppl task.stride=600", "task.stride=600"),
    ("task=requant task.bits=5", "task.bits=5"), ("task=requant +task.layer_bits={3:7}", "layer_bits.3"),
    ("task=pack task.align_bytes=1000", "task.align_bytes=1000"),
    ("task=serve task.port=70000", "task.port=70000 must be between 0 and 65535"),
    ("task=serve task.max_batch=0", "task.max_batch=0"),
    ("task=serve task.max_tokens_cap=0", "task.max_tokens_cap=0"),
    ("task=bench task.concurrency=0", "task.concurrency=0"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    cfg = resolve_hardware(compose_config(["hardware=linux_cpu", *override.split()]))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        validate(cfg)


async def test_checkpoint_dependent_limits(tiny) -> None:
    """The engine checks against the checkpoint in its own words; the CLI names the key."""
    from flashmoe.engine import Engine, EngineOptions
    from flashmoe.errors import OptionError
    from flashmoe.tasks.common import open_engine

    path = tiny("qwen3_moe")  # 16 experts
    with pytest.raises(OptionError, match="^experts_per_token=20 must be between 1 and 16"):
        await Engine.open(path, EngineOptions(experts_per_token=20), tokenizer=False)
    cfg = _ok(f"model.path={path}", "model.experts_per_token=20")
    with pytest.raises(ConfigError, match="^model.experts_per_token=20 must be between 1 and 16"):
        await open_engine(cfg)
    synth = resolve_hardware(compose_config(
        ["hardware=linux_cpu", "model=synth", "model.num_experts=4", "model.experts_per_token=5"]))
    with pytest.raises(ConfigError, match="model.experts_per_token=5 must be between 1 and 4"):
        validate(synth)  # synth knows its expert count without a checkpoint


def test_model_path_overrides_demo() -> None:
    assert model_kind(_ok().model) == "demo"
    assert model_kind(_ok("model.path=/ckpt").model) == "path"
    assert model_kind(_ok("model=path", "model.path=/ckpt").model) == "path"
    assert model_kind(_ok("model=synth", "model.path=/tmp/synth").model) == "synth"


@pytest.mark.parametrize("override,pieces", [
    ("hardware=nope", ["hardware=nope", "auto", "h200", "linux_cpu", "m3max", "m4pro", "m5max"]),
    ("task=nope", ["task=nope", "bench", "ppl", "requant"]),
    ("io.split=abc", ["io.split=abc", "int"]),
    ("io.foo=1", ["io.foo=1", "split", "threads", "retries"]),
    ("foo=1", ["foo=1", "max_tokens", "hardware"]),
    ("task=requant task.layer_bits={0:8}", ["+task.layer_bits={0:8}"]),
    ("io.split=[1", ["io.split=[1"]),
])
def test_hydra_errors_become_one_line(override: str, pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(override.split())
    text = str(info.value)
    assert "\n" not in text and "base_" not in text
    for piece in pieces:
        assert piece in text
    assert hydra_error_message(info.value.__cause__) == text


def test_hydra_settings_keep_stdout_clean() -> None:
    hydra = compose_config([], return_hydra_config=True).hydra  # Hydra resolves ${now:...}
    assert re.fullmatch(r"runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", hydra.run.dir)
    assert re.fullmatch(r"runs/multirun/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", hydra.sweep.dir)
    assert OmegaConf.to_container(hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert hydra.job.chdir is False
    for logging_cfg in (hydra.job_logging, hydra.hydra_logging):
        for handler in logging_cfg.handlers.values():
            assert handler.get("stream") != "ext://sys.stdout"


def test_yaml_files_stay_small() -> None:
    for path in conf_dir().rglob("*.yaml"):
        assert 5 <= len(path.read_text().splitlines()) <= 25, path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logging_writes_json_lines_and_switches_run_dir(tmp_path: Path, capsys) -> None:
    try:
        log = setup_logging(tmp_path / "a")
        log.info("token_sampled", token=7, elapsed_ms=1.5, path=tmp_path)
        log.warning("cache_thrashed", hit_rate=0.1)
        # the file handler (an earlier in-process run may have left a console handler first)
        first = next(h for h in logging.getLogger("flashmoe").handlers
                     if isinstance(h, logging.FileHandler))
        setup_logging(tmp_path / "b", run_id="job-1")
        log.info("run_finished")  # a logger made before the switch follows the new file
        assert first.stream is None  # FileHandler.close() dropped its stream
    finally:
        close_logging()
    a, b = _events(tmp_path / "a" / LOG_FILE), _events(tmp_path / "b" / LOG_FILE)
    assert [e["event"] for e in a] == ["token_sampled", "cache_thrashed"]
    assert all("timestamp" in e and e["run_id"] == f"{tmp_path.name}/a" for e in a)
    assert a[0]["token"] == 7 and a[0]["path"] == str(tmp_path)
    assert [(e["event"], e["run_id"]) for e in b] == [("run_finished", "job-1")]
    out, err = capsys.readouterr()
    assert out == ""  # stdout is reserved for generated text
    assert "cache_thrashed" in err and "token_sampled" not in err


def test_memory_accounting() -> None:
    assert 1 < total_memory_gb() < 10_000
    assert 0 < current_rss_gb() <= peak_rss_gb() + 0.01
    with RssSampler(interval_s=0.002) as sampler:
        block = b"\x01" * (64 << 20)  # written, so resident; built holding the GIL,
        time.sleep(0.05)  # so keep it alive while the sampler thread looks
        del block
    assert sampler.growth_gb > 0.04


def test_every_engine_option_has_its_config_key() -> None:
    """An engine error on any option reads, on the CLI, with the key that sets it."""
    from dataclasses import fields

    from flashmoe.config_errors import CONFIG_KEYS, config_error
    from flashmoe.engine import EngineOptions
    from flashmoe.errors import OptionError

    hooks = {"reader", "on_io_retry",  # callables for tests, not config
             "parallel", "run_context"}  # from the launcher (dist.*), not one key
    assert set(CONFIG_KEYS) == {f.name for f in fields(EngineOptions)} - hooks
    for option, key in CONFIG_KEYS.items():
        assert str(config_error(OptionError(option, True, "x"))) == f"{key}=true x"
    with pytest.raises(OptionError, match="^io_split=0 must be between 1 and 64$"):
        EngineOptions(io_split=0).check()
