"""Refuse bad overrides in one line before Hydra starts (Hydra's own errors are multi-line)."""
from __future__ import annotations

import itertools
import sys
from typing import Sequence

from flashmoe.config import compose_config, validate
from flashmoe.errors import ConfigError
from flashmoe.hardware import resolve_hardware

MAX_COMBINATIONS = 64


def precheck(argv: Sequence[str]) -> None:
    """Compose and validate every swept variant of the command line; exit 2 on the first bad one."""
    args = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    if any(a in ("-h", "--help", "--hydra-help", "--info", "--cfg") or a.startswith("--cfg")
           for a in argv):
        return
    try:
        for overrides in _variants(args):
            cfg = resolve_hardware(compose_config(overrides))
            validate(cfg)
    except ConfigError as e:
        print(f"flashmoe: {e}", file=sys.stderr)
        sys.exit(2)


def _variants(args: list[str]) -> list[list[str]]:
    """Expand `key=a,b` sweeps (Hydra's basic sweep syntax) into concrete override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as e:
        raise ConfigError(f"could not parse override {e.override!r}: "
                          f"{e.message.splitlines()[0]}") from None
    choices = []
    for arg, ov in zip(args, parsed):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([arg])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)]
