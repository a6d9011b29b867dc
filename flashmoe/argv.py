"""What the shell hands over becomes Hydra overrides: free-text keys take any text verbatim.

Hydra's override grammar gives `, ' " [ ] { } ( ) = : $` meaning, so `prompt=Hello, world`
would be a sweep and `prompt=What's up` a syntax error. A value of a free-text key is quoted
here with Hydra's own escaping (QuotedString.with_quotes) and OmegaConf's `\\${` escape, so
it arrives in the config exactly as typed; every other override keeps Hydra's grammar
(`-m io.split=1,2,4 prompt="a, b"` sweeps the split, not the prompt).
"""
from __future__ import annotations

import re
from typing import Sequence

# Keys whose value is text or a path, never a sweep, list or interpolation.
FREE_TEXT_KEYS = frozenset({
    "prompt", "system", "prompt_file", "data", "run_dir", "model.path",
    "task.prompt", "task.out", "task.reference_path",
})
_KEY = re.compile(r"^(\+\+|\+)?([A-Za-z_][\w.]*)=")
_INTERPOLATION = re.compile(r"(\\*)\$\{")


def hydra_quote(text: str) -> str:
    """`text` as one Hydra quoted value whose composed config value is exactly `text`."""
    from hydra.core.override_parser.types import Quote, QuotedString

    if "${" in text:  # OmegaConf resolves ${...} inside strings: \${ is a literal ${, and
        # the backslashes before it double (n of them become 2n + 1)
        text = _INTERPOLATION.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)
    return QuotedString(text=text, quote=Quote.single).with_quotes()


def free_text_key(arg: str) -> str | None:
    """The free-text key `arg` sets (`prompt` for `prompt=...` or `++prompt=...`), else None."""
    m = _KEY.match(arg)
    return m.group(2) if m and m.group(2) in FREE_TEXT_KEYS else None


def to_overrides(argv: Sequence[str]) -> list[str]:
    """argv with each free-text `key=value` rewritten as `key='<value, Hydra-escaped>'`."""
    out = []
    for arg in argv:
        if free_text_key(arg) is not None:
            head, _, value = arg.partition("=")
            arg = f"{head}={hydra_quote(value)}"
        out.append(arg)
    return out
