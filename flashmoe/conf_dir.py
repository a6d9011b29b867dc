"""Where the Hydra YAML lives: `conf/` at the top of a checkout (and of an editable install),
`flashmoe/conf/` inside an installed wheel (pyproject maps one onto the other)."""
from __future__ import annotations

from pathlib import Path

import flashmoe

_PACKAGE = Path(flashmoe.__file__).resolve().parent


def conf_dir() -> Path:
    """The folder holding config.yaml and the group folders (hardware/, model/, ...)."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"flashmoe's config folder is missing: neither {_PACKAGE / 'conf'} "
                            f"nor {_PACKAGE.parent / 'conf'} holds config.yaml; reinstall flashmoe")


def available_options(group: str) -> list[str]:
    """The YAML options of a config group as shipped (schemas excluded)."""
    folder = conf_dir() / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix == ".yaml")
