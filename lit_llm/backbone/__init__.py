"""The shared model: pure ``torch.nn``, no Lightning."""

from lit_llm.backbone.cache import KVCache
from lit_llm.backbone.config import PRESETS, ModelConfig
from lit_llm.backbone.model import Transformer, count_parameters

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "count_parameters"]
