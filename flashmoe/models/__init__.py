"""Model families: which mlx-lm architectures flashmoe streams, and how."""
from __future__ import annotations

from flashmoe.errors import CheckpointError
from flashmoe.models.base import Family
from flashmoe.models.mixtral import Mixtral
from flashmoe.models.qwen2_moe import Qwen2Moe
from flashmoe.models.qwen3_5_moe import Qwen3_5Moe
from flashmoe.models.qwen3_moe import Qwen3Moe
from flashmoe.models.qwen3_next import Qwen3Next

FAMILIES: tuple[type[Family], ...] = (Qwen3_5Moe, Qwen3Next, Qwen3Moe, Mixtral, Qwen2Moe)
SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(config: dict, where: str = "config.json") -> Family:
    """The adapter for a checkpoint's model_type, or a CheckpointError listing the supported."""
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam()
    raise CheckpointError(
        f"{where}: model_type={model_type!r} is not a mixture-of-experts family flashmoe "
        f"supports; supported: {', '.join(SUPPORTED)}"
    )
