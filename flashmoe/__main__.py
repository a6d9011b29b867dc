"""`python -m flashmoe [group=option ...] [key=value ...]` — see README.md."""
from __future__ import annotations

import os
import sys
from typing import Sequence

import hydra
from omegaconf import DictConfig

from flashmoe.argv import to_overrides
from flashmoe.cli import precheck
from flashmoe.conf_dir import conf_dir


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    from flashmoe.app import main

    code = main(cfg)
    if code:
        sys.exit(code)


def _require_mlx_backend() -> None:
    """On Linux the `mlx` package needs a backend package (mlx-cpu or mlx-cuda-*) for libmlx."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        print(f"flashmoe: MLX cannot load its backend library ({e}); install the build for this "
              "machine: pip install \"mlx[cpu]==0.32.4\" (CPU) or pip install "
              "\"mlx[cuda13]==0.32.4\" (NVIDIA GPU); in a checkout `make run` picks one (README)",
              file=sys.stderr)
        sys.exit(1)


def cli(argv: Sequence[str]) -> None:
    """Free-text keys quoted for Hydra, the command line checked, then Hydra runs the job."""
    user_wants_trace = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them
    _require_mlx_backend()  # first: the argument checks below import MLX themselves
    try:
        args = to_overrides(argv)
        precheck(args)
        sys.argv = [sys.argv[0], *args]
        _job()
    except KeyboardInterrupt:  # Ctrl-C before a run started (a started run handles its own)
        print("flashmoe: interrupted before the run started", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # Hydra's own failures (the job reports its errors itself)
        if user_wants_trace:
            raise
        from flashmoe.config_errors import hydra_failure_message

        print(f"flashmoe: {hydra_failure_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(sys.argv[1:])
