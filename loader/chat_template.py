"""Chat templates: a model's own Jinja template rendered in a sandbox, ChatML when it has none.

Rendered as Hugging Face's `apply_chat_template` renders them, so that a prompt is the text the model
was trained on: an immutable sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loop
controls extension, a `tojson` filter that keeps non-ASCII text, and the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools`/`documents` (None: no tools here),
`raise_exception` and `strftime_now`. The sandbox keeps a template (a model file is untrusted input)
from reaching Python internals or mutating what it is given.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from loader.errors import FormatError

# used only for a model whose files carry no template; the statistics say so
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


class TemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or failed while rendering."""


def _raise(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:       # a declared dependency; say what is missing rather than fail obscurely
        raise FormatError("rendering a chat template needs the jinja2 package (pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise FormatError(f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def check_messages(messages) -> list[dict]:
    msgs = list(messages)
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message must be a dict with str 'role' and 'content', got {m!r}")
    return msgs


def render(template: str, messages, *, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "", **extra) -> str:
    """The prompt text `template` makes of `messages` ([{"role", "content"}, ...])."""
    msgs = check_messages(messages)
    tpl = _compile(template)
    try:
        return tpl.render(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                          eos_token=eos_token, tools=None, documents=None, **extra)
    except TemplateError:
        raise
    except Exception as e:        # a template bug or a sandbox refusal: one clear error, not a traceback
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
