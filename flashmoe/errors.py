"""User-facing errors: one paragraph naming what is wrong and what would be right."""
from __future__ import annotations


class FlashMoeError(Exception):
    """Base of every error flashmoe reports to a user (printed without a traceback)."""


class ConfigError(FlashMoeError):
    """A configuration value is out of range or unknown."""


class CheckpointError(FlashMoeError):
    """The checkpoint directory is missing, truncated, or not a supported MoE model."""


class ExpertReadError(FlashMoeError):
    """Reading expert bytes from disk failed after the allowed retries."""


class OptionError(ConfigError):
    """An engine option is out of range, in the engine's own words (EngineOptions fields).

    The CLI names the same value by its config key; flashmoe.config.config_key maps one to
    the other, so a user of `python -m flashmoe` reads `io.split=0 ...`."""

    def __init__(self, option: str, value: object, expect: str) -> None:
        super().__init__(f"{option}={value} {expect}")
        self.option, self.value, self.expect = option, value, expect


class WriteError(FlashMoeError):
    """Writing an output failed (no space, quota, read-only folder, disk error) or would fail."""
