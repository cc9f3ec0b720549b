"""Tokenizer loading, eos ids and chat message normalization."""
from __future__ import annotations

import hashlib
import json
import os

_TEMPLATES_DIR = os.path.join(os.path.dirname(__file__), "chat_templates")
# Chat templates replaced by a shipped one, by the sha256 of their text. SmolLM2-Instruct's
# own template ignores ``tools`` and fails on ``content: null``; ours renders its
# function-calling format and is otherwise the same, character for character.
SHIPPED_TEMPLATES = {
    "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788": "smollm2_tools.jinja",
}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        shipped = SHIPPED_TEMPLATES.get(hashlib.sha256(template.encode()).hexdigest())
        if shipped is not None:
            tokenizer.original_chat_template = template
            tokenizer.chat_template = shipped_template(shipped)
    return tokenizer


def shipped_template(name: str) -> str:
    with open(os.path.join(_TEMPLATES_DIR, name), encoding="utf-8") as f:
        return f.read()


def eos_token_ids(model_dir: str, tokenizer) -> frozenset[int]:
    """eos ids from generation_config.json (int or list), config.json and the tokenizer."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                break
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Chat messages with ``content`` as a plain string (OpenAI also allows a list of parts)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'.")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"messages[{i}].content: only text parts are supported.")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content: a text part needs a string 'text'.")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            if m["role"] in ("user", "system", "developer"):
                raise ValueError(f"messages[{i}] ({m['role']}) needs a 'content'.")
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts.")
        message = {**m, "content": content}
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(i, m)
        out.append(message)
    return out


def _tool_calls(i: int, m: dict) -> list[dict]:
    """An assistant turn's OpenAI ``tool_calls``, with each ``function.arguments`` (a JSON
    string on the wire) as the object that chat templates render."""
    calls = m["tool_calls"]
    if m["role"] != "assistant" or not isinstance(calls, list):
        raise ValueError(f"messages[{i}].tool_calls must be a list, on an assistant message.")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': "
                             f"{{'name', 'arguments'}}}}.")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from e
        if not isinstance(args, dict):
            raise ValueError(f"{where}.function.arguments must be a JSON object.")
        out.append({**call, "type": "function", "function": {**fn, "arguments": args}})
    return out


def render_chat(tokenizer, messages, add_generation_prompt: bool = True,
                chat_template_kwargs: dict | None = None, max_chars: int | None = None) -> dict:
    """{"prompt", "prompt_token_ids"} for a conversation, through the tokenizer's chat
    template; a rendering longer than ``max_chars`` is refused before it is tokenized."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template.")
    text = tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {}))
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"the rendered chat is {len(text)} characters, more than this engine "
                         f"takes (max_prompt_chars={max_chars}).")
    # The template already spells out special tokens such as BOS.
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
