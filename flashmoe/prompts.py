"""Where the prompt comes from: `prompt=`, `prompt=-` or piped stdin, `prompt_file=`, a default.

Text read from a file or stdin loses one trailing newline (the one `echo` and editors add);
everything else reaches the tokenizer as it is.
"""
from __future__ import annotations

import select
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from flashmoe.config import DEFAULT_PROMPT
from flashmoe.errors import ConfigError

STDIN_HINT_AFTER_S = 2.0


@dataclass(frozen=True, slots=True)
class Prompt:
    """The text to answer (None: open an interactive chat) and where it came from."""

    text: str | None
    origin: str  # prompt | stdin | prompt_file | default | terminal


def resolve_prompt(cfg: DictConfig, stdin: TextIO | None = None) -> Prompt:
    """The prompt a generate run answers, read from wherever the config says."""
    stdin = stdin if stdin is not None else sys.stdin
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise ConfigError(f"prompt= and prompt_file={cfg.prompt_file} are both set; give one "
                          "(prompt=TEXT, prompt=- for standard input, or prompt_file=PATH)")
    if cfg.prompt_file is not None:
        return Prompt(_read_file(cfg.prompt_file), "prompt_file")
    if cfg.prompt == "-":
        text = _read_stdin(stdin)
        if text is None:
            raise ConfigError("prompt=- but standard input is closed or unreadable; pipe the text "
                              "in, or give prompt=TEXT or prompt_file=PATH")
        return Prompt(text, "stdin")
    if cfg.prompt is not None:
        return Prompt(cfg.prompt, "prompt")
    if not _isatty(stdin):  # `echo ... | python -m flashmoe`, `python -m flashmoe < file`
        text = _read_stdin(stdin)  # None: closed or unreadable (a daemon, a test runner)
        if text:
            return Prompt(text, "stdin")
    elif cfg.chat:
        return Prompt(None, "terminal")
    return Prompt(DEFAULT_PROMPT, "default")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _strip_newline(text: str) -> str:
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _read_file(name: str) -> str:
    path = Path(name).expanduser()
    try:
        return _strip_newline(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"prompt_file={name} does not exist; give the path of a text file "
                          "(or prompt=TEXT)") from None
    except IsADirectoryError:
        raise ConfigError(f"prompt_file={name} is a directory; give the path of a text file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt_file={name} is not UTF-8 text (byte {e.start}); save it as "
                          "UTF-8") from None
    except OSError as e:
        raise ConfigError(f"prompt_file={name} cannot be read ({e.strerror})") from None


def _read_stdin(stdin: TextIO | None) -> str | None:
    """All of stdin (None if it cannot be read); says on stderr what it waits for if nothing
    arrives for a while."""
    try:
        ready, _, _ = select.select([stdin], [], [], STDIN_HINT_AFTER_S)
    except (OSError, ValueError, TypeError):  # no fileno (a test double): just read
        ready = [stdin]
    if not ready:
        print("flashmoe: reading the prompt from standard input until end of file (Ctrl-D); "
              "give prompt=TEXT to skip", file=sys.stderr)
    try:  # the bytes as UTF-8 whatever the locale says
        data = stdin.buffer.read().decode("utf-8") if hasattr(stdin, "buffer") else stdin.read()
        return _strip_newline(data)
    except UnicodeDecodeError:
        raise ConfigError("standard input is not UTF-8 text; pipe UTF-8 or use prompt_file=PATH") from None
    except (OSError, ValueError, AttributeError):  # closed (<&-) or not readable
        return None
