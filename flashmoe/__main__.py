"""`python -m flashmoe [group=option ...] [key=value ...]` — see README.md."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from flashmoe.cli import precheck
from flashmoe.conf_dir import conf_dir


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    from flashmoe.app import main

    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        precheck(sys.argv[1:])
        _job()
    except KeyboardInterrupt:  # Ctrl-C before a run started (a started run handles its own)
        print("flashmoe: interrupted before the run started", file=sys.stderr)
        sys.exit(130)
