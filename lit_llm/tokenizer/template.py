"""Chat templates: the Jinja text a model ships with, rendered the way Hugging Face ``transformers`` renders it.

A chat template turns ``messages`` (``[{"role": ..., "content": ...}, ...]``) into the text a model was
tuned on. :class:`ChatTemplate` compiles one in a sandboxed Jinja environment with the settings
``apply_chat_template`` uses (``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text), and the variables it passes (``messages``,
``add_generation_prompt``, the special tokens ``bos_token`` / ``eos_token`` / ... as strings).

Which tokens are the assistant's reply is found by rendering prefixes of the conversation (see
:func:`assistant_spans`): the reply of message ``i`` is what ``messages[: i + 1]`` adds to ``messages[:i]``
rendered with a generation prompt. A template for which those prefixes do not line up cannot be split into
turns and is refused.

``LIT_LLM_TEMPLATE`` is lit_llm's own format (``<|bos|>``, then ``<|role|>content<|end|>`` per message,
``<|assistant|>`` as the generation prompt): the template of the tokenizers trained here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_llm.errors import UserError


class ChatTemplateError(UserError):
    """A chat template that is missing, fails to render, or cannot be split into turns."""


# lit_llm's own chat format, self-contained (literal special tokens, its own role check) so that any renderer
# (transformers, llama.cpp's) gives the same text
LIT_LLM_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' and message['role'] != 'user' and message['role'] != 'assistant' -%}"
    "{{- raise_exception('roles must be one of system, user, assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' marker of assistant text; rendered as its body
    (the spans come from :func:`assistant_spans` for every template, marked or not)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {err.lineno}): {err}") from None


class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to.

    Args:
        source: The Jinja text (``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``).
        special_tokens: ``{"bos_token": "<s>", "eos_token": ..., ...}`` passed to the template as variables.
    """

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        self.source = source
        self.template = _compile(source)
        self.special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        try:
            return self.template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template failed to render: {err}") from None


def assistant_spans(template: ChatTemplate, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``text`` (the rendered conversation) added by each assistant message.

    The span of message ``i`` starts where ``messages[:i]`` with a generation prompt ends and ends where
    ``messages[: i + 1]`` ends: the reply, the template's end-of-turn marker and whatever the template writes
    after it (a newline, ...), which the caller trims at the end-of-turn token.

    Raises:
        ChatTemplateError: If the renderings are not prefixes of one another (the template renders earlier
            turns differently once later ones exist, or the generation prompt is not how a reply starts).
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1])
        if not upto.startswith(before) or not text.startswith(upto):
            raise ChatTemplateError(
                f"this chat template cannot be split into turns: the conversation up to message {i} (an "
                "assistant reply) does not start with the text the template renders for the messages before "
                "it plus the generation prompt, so which tokens are the reply is not defined. Pass a template "
                "that renders each turn independently (--chat_template FILE)"
            )
        spans.append((len(before), len(upto)))
    return spans
