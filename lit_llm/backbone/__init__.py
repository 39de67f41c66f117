"""The shared model: pure ``torch.nn``, no Lightning."""

from lit_llm.backbone.cache import KVCache
from lit_llm.backbone.config import PRESETS, ModelConfig, VisionConfig
from lit_llm.backbone.model import Transformer, count_active_parameters, count_parameters
from lit_llm.backbone.moe import MoE, moe_aux_losses

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "MoE",
    "Transformer",
    "VisionConfig",
    "count_active_parameters",
    "count_parameters",
    "moe_aux_losses",
]
