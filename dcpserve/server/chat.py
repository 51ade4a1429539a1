"""Chat prompt encoding.

Two sources, in this order:
1. a jinja `chat_template` from the checkpoint's tokenizer_config.json, rendered the way HF's
   `apply_chat_template` does (sandboxed, `add_generation_prompt=True`, `bos_token`/`eos_token`, plus the
   request's `chat_template_kwargs`);
2. the DeepSeek-V3.2 encoding (DeepSeek-V3.2 ships it as Python, not jinja): BOS, the system prompt, then
   `<｜User｜>{user}<｜Assistant｜>` followed by `<think>` (thinking mode, last user turn) or `</think>`
   (non-thinking, and every earlier turn), and `{assistant}<｜end▁of▁sentence｜>` for history. Reasoning
   of earlier turns is dropped, as the official encoder does by default.

Thinking mode is selected with `chat_template_kwargs: {"thinking": true}` (`enable_thinking` also works).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"


class ChatTemplateError(ValueError):
    """The messages cannot be encoded; the message says why (becomes a 400)."""


@dataclass
class Message:
    role: str  # system | developer | user | assistant
    content: str
    reasoning_content: str | None = None


def thinking_enabled(kwargs: dict[str, Any] | None) -> bool:
    kwargs = kwargs or {}
    value = kwargs.get("thinking", kwargs.get("enable_thinking", False))
    if not isinstance(value, bool):
        raise ChatTemplateError("chat_template_kwargs.thinking must be a boolean")
    return value


def encode_deepseek_v32(messages: list[Message], thinking: bool, bos: str = BOS) -> str:
    if not any(m.role == "user" for m in messages):
        raise ChatTemplateError("messages must contain at least one user message")
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    turns = [m for m in messages if m.role not in ("system", "developer")]
    last_user = max(i for i, m in enumerate(turns) if m.role == "user")
    out = [bos, system]
    for i, m in enumerate(turns):
        is_last = i == len(turns) - 1
        if m.role == "user":
            out.append(USER + m.content)
            # The assistant marker opens a reply; a user turn followed by another user turn gets none.
            if is_last or turns[i + 1].role == "assistant":
                out.append(ASSISTANT)
                out.append(THINK_START if thinking and i == last_user else THINK_END)
        else:
            if thinking and i > last_user and m.reasoning_content:
                out.append(m.reasoning_content + THINK_END)
            out.append(m.content)
            if not is_last:  # a final assistant message is a prefix to continue, so it stays open
                out.append(EOS)
    return "".join(out)


@dataclass
class ChatFormatter:
    template: str | None = None  # jinja source from tokenizer_config.json
    bos_token: str = BOS
    eos_token: str = EOS

    @classmethod
    def from_model_path(cls, model_path: str | None) -> ChatFormatter:
        cfg = _read_tokenizer_config(model_path)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(template=template if isinstance(template, str) and template else None,
                   bos_token=_token_text(cfg.get("bos_token"), BOS),
                   eos_token=_token_text(cfg.get("eos_token"), EOS))

    def render(self, messages: list[Message], kwargs: dict[str, Any] | None = None) -> str:
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        if self.template is not None:
            return self._render_jinja(messages, kwargs or {})
        return encode_deepseek_v32(messages, thinking_enabled(kwargs), self.bos_token)

    def _render_jinja(self, messages: list[Message], kwargs: dict[str, Any]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        msgs = [{"role": m.role, "content": m.content,
                 **({"reasoning_content": m.reasoning_content} if m.reasoning_content is not None else {})}
                for m in messages]
        variables = {"add_generation_prompt": True, "bos_token": self.bos_token, "eos_token": self.eos_token,
                     "tools": None, **kwargs, "messages": msgs}
        try:
            return env.from_string(self.template).render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template bug must not become a 500 for this request
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _read_tokenizer_config(model_path: str | None) -> dict[str, Any]:
    if not model_path:
        return {}
    path = os.path.join(model_path, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
