"""Model families: which mlx-lm architectures flashmoe streams, and how."""
from __future__ import annotations

from flashmoe.errors import CheckpointError
from flashmoe.models.base import Family, MlxLmFamily
from flashmoe.models.mixtral import Mixtral
from flashmoe.models.qwen2_moe import Qwen2Moe
from flashmoe.models.qwen3_5_moe import Qwen3_5Moe
from flashmoe.models.qwen3_moe import Qwen3Moe
from flashmoe.models.qwen3_next import Qwen3Next

# hand-written adapters: walked layer by layer (and batched); README's family table
ADAPTERS: tuple[type[Family], ...] = (Qwen3_5Moe, Qwen3Next, Qwen3Moe, Mixtral, Qwen2Moe)
# mlx-lm's own forward with proxied experts; each has a tiny-checkpoint parity test
# (tests/test_families.py). Kimi-K2 checkpoints are model_type deepseek_v3.
MLX_LM: tuple[MlxLmFamily, ...] = (
    MlxLmFamily(("olmoe",)),
    MlxLmFamily(("minimax", "gpt_oss", "llama4", "phimoe", "granitemoe"),
                experts_key="num_local_experts"),
    MlxLmFamily(("deepseek_v3", "glm4_moe", "dots1"), experts_key="n_routed_experts"),
)
SUPPORTED = tuple(t for f in (*ADAPTERS, *MLX_LM) for t in f.model_types)


def family_for(config: dict, where: str = "config.json") -> Family:
    """The adapter for a checkpoint's model_type, or a CheckpointError listing the supported."""
    model_type = config.get("model_type")
    for fam in ADAPTERS:
        if model_type in fam.model_types:
            return fam()
    for generic in MLX_LM:
        if model_type in generic.model_types:
            return generic
    raise CheckpointError(
        f"{where}: model_type={model_type!r} is not a mixture-of-experts family flashmoe "
        f"supports; supported: {', '.join(SUPPORTED)}"
    )
