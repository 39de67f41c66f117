"""Tokenizers of every model, their chat templates and the assistant-span masks (see :mod:`.tokenizer`)."""

from lit_llm.tokenizer.template import LIT_LLM_TEMPLATE, ChatTemplate, ChatTemplateError
from lit_llm.tokenizer.tokenizer import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKENS,
    PATCH,
    ROLES,
    SPECIAL_TOKENS,
    TILE_X,
    TILE_Y,
    UNK,
    Tokenizer,
)

__all__ = [
    "IMAGE",
    "IMAGE_END",
    "IMAGE_START",
    "IMAGE_TOKENS",
    "LIT_LLM_TEMPLATE",
    "PATCH",
    "ROLES",
    "SPECIAL_TOKENS",
    "TILE_X",
    "TILE_Y",
    "UNK",
    "ChatTemplate",
    "ChatTemplateError",
    "Tokenizer",
]
