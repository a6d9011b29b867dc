"""One-line messages for Hydra's and OmegaConf's composition errors (key, value, what is valid),
and engine option errors reworded with the config key that sets the option."""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import Any, Optional

from flashmoe.conf_dir import available_options
from flashmoe.errors import ConfigError, OptionError

# EngineOptions field -> the config key that sets it (engine errors name fields; users keys)
CONFIG_KEYS = {
    "experts_per_token": "model.experts_per_token", "io_split": "io.split",
    "io_threads": "io.threads", "io_retries": "io.retries", "io_direct": "io.direct",
    "io_verify": "io.verify", "io_readahead": "io.readahead", "cuda_copy": "io.cuda_copy",
    "layout": "io.layout",
    "cache_policy": "cache.policy",
    "cache_budget_gb": "cache.budget_gb", "prefetch": "cache.prefetch",
    "cache_host_budget_gb": "cache.host_budget_gb",
    "cache_clean_ahead": "cache.clean_ahead",
    "device": "hardware.device", "dtype": "hardware.dtype",
}


def _field_type(schema: Any, key: Any) -> str:
    for f in fields(schema) if is_dataclass(schema) else ():
        if f.name == key:
            kind = str(f.type)
            return kind[9:-1] + " or null" if kind.startswith("Optional[") else kind
    return "a value of another type"


def _omegaconf_message(err: Any, exc: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    schema = err.object_type
    # Hydra's own text names the override: "Could not override 'io.foo'. ... use +io.foo=1".
    override = re.search(r"use \+(\S+)", str(exc))
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and override:
        key, _, value = override.group(1).partition("=")
        if not is_dataclass(schema):  # a dict value: Hydra merges into it and cannot add keys
            return f"{key}={value} adds keys to {key}; write it as +{key}={value}"
        parent = key.rpartition(".")[0] or "the top level"
        known = ", ".join(f.name for f in fields(schema))
        return f"{key}={value} is not a known key; {parent} has: {known} (+{key}=... adds one)"
    first = str(err.msg).splitlines()[0] if getattr(err, "msg", None) else type(err).__name__
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) or not is_dataclass(schema):
        return f"{err.full_key}={err.value}: {first}"
    return f"{err.full_key}={err.value} is not valid: expected {_field_type(schema, err.key)}"


def hydra_error_message(exc: BaseException) -> str:
    """One line for Hydra's composition errors: the key, the value and what would be valid."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.rpartition("/")
        options = [o for o in exc.options or () if not o.startswith("base_")] or available_options(group)
        return f"{group}={value} is not an option of {group}; available: {', '.join(options)}"
    if isinstance(exc, OverrideParseException):
        return f"could not parse override {exc.override!r}: {exc.message.splitlines()[0]}"
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return _omegaconf_message(cause, exc)
        cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(exc).__name__


def hydra_failure_message(exc: BaseException) -> str:
    """One line for whatever stopped Hydra before the job ran (composition, run directory)."""
    from hydra.errors import HydraException

    if isinstance(exc, OSError) and not isinstance(exc, HydraException):  # not MissingConfig
        where = exc.filename or "the run directory"
        return (f"cannot write {where} ({exc.strerror or exc}); choose a writable run directory: "
                "hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m), or run_dir=DIR")
    return hydra_error_message(exc)


def config_error(err: OptionError) -> ConfigError:
    """An engine option error, reworded with the config key that sets the option."""
    value = str(err.value).lower() if isinstance(err.value, bool) else err.value
    return ConfigError(f"{CONFIG_KEYS.get(err.option, err.option)}={value} {err.expect}")
