"""Refuse bad command lines in one line before Hydra starts (Hydra's own errors are multi-line)."""
from __future__ import annotations

import itertools
import shlex
import sys
from typing import Any, NoReturn, Sequence

from flashmoe.config import compose_config
from flashmoe.config_validate import validate
from flashmoe.errors import ConfigError
from flashmoe.hardware import resolve_hardware

MAX_COMBINATIONS = 64
GRAMMAR_HINT = ("in Hydra's override grammar , [ ] { } ( ) ' \" = : and spaces are special: "
                "quote the value (key='a, b'), write a list as key=[1,2] and a sweep as -m key=1,2")
INFO_FLAGS = ("help", "hydra_help", "info", "cfg", "shell_completion", "version")


def precheck(argv: Sequence[str]) -> None:
    """Compose and validate every swept variant of the command line; exit 2 on the first bad one."""
    try:
        parsed = parse_flags(argv)
        if any(getattr(parsed, flag, None) for flag in INFO_FLAGS):
            return
        args = [a for a in parsed.overrides if not a.lstrip("+~").startswith("hydra")]
        for overrides in _variants(args):
            cfg = resolve_hardware(compose_config(overrides))
            validate(cfg)
    except ConfigError as e:
        print(f"flashmoe: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: Sequence[str]) -> Any:
    """Hydra's own argument parser, its usage errors as ConfigError."""
    from hydra._internal.utils import get_args_parser

    def refuse(message: str) -> NoReturn:
        raise ConfigError(f"{message}; flags are -m/--multirun, --cfg job, --info, --help, and "
                          "everything else is key=value")

    parser = get_args_parser()
    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(list(argv))


def _variants(args: list[str]) -> list[list[str]]:
    """Expand `key=a,b` sweeps (Hydra's basic sweep syntax) into concrete override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if "=" not in arg and not arg.startswith("~"):
            raise ConfigError(f"{arg!r} is not key=value; to give it as the prompt write "
                              f"{shlex.quote('prompt=' + arg)}; a group option is group=option "
                              "(task=bench)")
    try:
        parsed = parser.parse_overrides(args)
    except OverrideParseException as e:
        raise ConfigError(f"could not parse override {e.override!r} "
                          f"({e.message.splitlines()[0]}); {GRAMMAR_HINT}") from None
    choices = []
    for arg, ov in zip(args, parsed):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([arg])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)]
