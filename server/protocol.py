"""OpenAI request parsing and response shapes; errors in OpenAI's format.

Unknown fields are ignored (as OpenAI does); known fields of the wrong type are a 400
naming the field.
"""
from __future__ import annotations

import functools
import json
import re
import time
import uuid
from dataclasses import dataclass

from engine import SamplingParams
from engine.core.structured_outputs import StructuredOutputsParams
from engine.outputs import CompletionOutput
from engine.tokenizer import normalize_messages, render_chat

from .tools.parsers import detect_parser
from .tools.request import ToolRequest, ToolsError, parse_tools

_MISSING = object()


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_field(name: str, message: str) -> APIError:
    return APIError(400, message, param=name)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# A lone surrogate can only come in as a \uD800-\uDFFF escape or as its raw 3-byte form
# (json.loads decodes bytes with "surrogatepass"): a body with neither needs no deeper check.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def parse_json(data: bytes) -> dict:
    """A request body as a JSON object, or a 400: strict JSON (no NaN / Infinity), bounded
    nesting, and no lone UTF-16 surrogates (which no response could encode back)."""
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError as e:
        raise APIError(400, "request body is nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if _MAYBE_SURROGATE.search(data) is None:
        return body
    try:  # a valid surrogate pair is fine: encode every string of the body to find out
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, "request body holds invalid Unicode (a lone surrogate escape such "
                            "as \\ud800)") from e
    except RecursionError as e:
        raise APIError(400, "request body is nested too deeply") from e
    return body


def field(body: dict, name: str, kind: str, default=None):
    """body[name] checked against kind: int, number, bool, str, dict, str_or_list."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
        "str_or_list": lambda v: isinstance(v, str) or (
            isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "int_list": lambda v: isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v),
    }[kind](value)
    if not ok:
        raise bad_field(name, f"'{name}' must be of type {kind.replace('_', ' ')}, got {value!r:.80}.")
    return value


SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "top_k": "int", "min_p": "number", "n": "int",
    "seed": "int", "presence_penalty": "number", "frequency_penalty": "number",
    "repetition_penalty": "number", "ignore_eos": "bool", "min_tokens": "int",
    "stop": "str_or_list", "stop_token_ids": "int_list", "skip_special_tokens": "bool",
    "include_stop_str_in_output": "bool",
}


def structured_outputs(body: dict):
    """The request's output constraint, from OpenAI's ``response_format`` or vLLM's
    ``structured_outputs`` (and its older ``guided_*`` fields); None when unconstrained.
    Returns (StructuredOutputsParams | None, the field it came from)."""
    sources = [k for k in ("response_format", "structured_outputs") if body.get(k) is not None]
    guided = {k[7:]: body[k] for k in ("guided_json", "guided_regex", "guided_choice",
                                       "guided_grammar") if body.get(k) is not None}
    if guided:
        sources.append("guided_*")
    if len(sources) > 1:
        raise bad_field(sources[1], f"give one of {', '.join(sources)}, not several.")
    if not sources:
        return None, None
    name = sources[0]
    try:
        if name == "response_format":
            return _response_format(field(body, name, "dict")), name
        if name == "structured_outputs":
            return StructuredOutputsParams.from_dict(field(body, name, "dict")), name
        return StructuredOutputsParams.from_dict(guided), name
    except ValueError as e:
        raise bad_field(name, str(e)) from e


def logit_bias(value: dict) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings) -> int keys."""
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_field("logit_bias", f"logit_bias keys must be token ids, got {key!r:.40}.") from None
        out[token] = bias
    return out


def _response_format(rf: dict):
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise ValueError("response_format json_schema needs json_schema.schema (an object).")
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(f"response_format.type must be text, json_object or json_schema, "
                     f"got {kind!r:.60}.")


def sampling_params(body: dict, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None,
                    forced: StructuredOutputsParams | None = None) -> SamplingParams:
    """``forced``: a constraint of the server's own (a tool call that must be made), which
    the request may not combine with one of its own."""
    kwargs = {}
    if prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    for name, kind in SAMPLING_FIELDS.items():
        value = field(body, name, kind)
        if value is not None:
            kwargs[name] = value
    if max_tokens is not None and max_tokens < 1:
        raise bad_field("max_tokens", f"'max_tokens' must be at least 1, got {max_tokens}.")
    constraint, source = structured_outputs(body)
    if forced is not None:
        if constraint is not None:
            raise bad_field(source, f"{source} cannot be combined with a tool_choice that "
                                    f"forces a tool call.")
        constraint = forced
    bias = field(body, "logit_bias", "dict")
    if bias is not None:
        kwargs["logit_bias"] = logit_bias(bias)
    best_of = field(body, "best_of", "int")
    if best_of not in (None, 1):  # accepted for compatibility only as what n already does
        raise bad_field("best_of", f"best_of > 1 is not supported (got {best_of}); use n.")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              structured_outputs=constraint, **kwargs)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        known = name in SAMPLING_FIELDS or name in ("max_tokens", "logprobs", "logit_bias",
                                                    "prompt_logprobs")
        raise bad_field(name if known else None, str(e)) from e


@dataclass
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far on every chunk


def stream_options(body: dict) -> StreamOptions:
    opts = field(body, "stream_options", "dict", {})
    return StreamOptions(bool(field(opts, "include_usage", "bool", False)),
                         bool(field(opts, "continuous_usage_stats", "bool", False)))


def completion_prompts(body: dict) -> list:
    """The completions ``prompt``: str, list of str, token ids, or list of token-id lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_field("prompt", "'prompt' is required.")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [{"prompt_token_ids": prompt}]
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [{"prompt_token_ids": p} for p in prompt]
    raise bad_field("prompt", "'prompt' must be a string, a list of strings, a list of token "
                              "ids or a list of token-id lists, and not empty.")


@dataclass
class ParsedRequest:
    # each: str, {"prompt_token_ids": [...]}, {"prompt", "prompt_token_ids"}, or a callable
    # returning one (a chat template to render, off the event loop)
    prompts: list
    params: SamplingParams
    stream: bool = False
    stream_options: StreamOptions = None
    echo: bool = False
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field was asked for
    tools: ToolRequest | None = None  # chat: tool calls to parse out of the output
    return_token_ids: bool = False  # completions: vLLM's token ids in each choice


def _prompt_logprobs(body: dict) -> int | None:
    value = field(body, "prompt_logprobs", "int")
    if value is not None and not 0 <= value <= 20:
        raise bad_field("prompt_logprobs", "'prompt_logprobs' must be between 0 and 20.")
    return value


def parse_completion(body: dict) -> ParsedRequest:
    prompts = completion_prompts(body)
    logprobs = field(body, "logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise bad_field("logprobs", "'logprobs' must be between 0 and 20.")
    echo = field(body, "echo", "bool", False)
    asked = _prompt_logprobs(body)
    prompt_lp = asked
    if echo and logprobs is not None:  # the echoed prompt's tokens get logprobs too
        prompt_lp = max(asked or 0, logprobs)
    params = sampling_params(body, field(body, "max_tokens", "int", 16), logprobs, prompt_lp)
    return ParsedRequest(prompts, params, field(body, "stream", "bool", False),
                         stream_options(body), echo, asked is not None,
                         return_token_ids=field(body, "return_token_ids", "bool", False))


# apply_chat_template's own parameters: a client passing them through chat_template_kwargs
# would change how the template is applied rather than fill it in.
_TEMPLATE_ARGS = {"conversation", "tools", "documents", "add_generation_prompt",
                  "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                  "return_tensors", "return_dict", "return_assistant_tokens_mask",
                  "tokenizer_kwargs"}


def chat_template_args(body: dict, trust_request_template: bool) -> dict:
    """The template keyword arguments a request may set. A template of the client's own is
    code the server would run: refused unless the operator trusts clients with it."""
    kwargs = dict(field(body, "chat_template_kwargs", "dict", {}))
    template = field(body, "chat_template", "str", kwargs.pop("chat_template", None))
    if template is not None:
        if not trust_request_template:
            raise bad_field("chat_template", "this server does not accept chat templates in "
                            "requests (start it with --trust-request-chat-template to allow it).")
        if not isinstance(template, str):
            raise bad_field("chat_template", "'chat_template' must be a string.")
        kwargs["chat_template"] = template
    reserved = sorted(_TEMPLATE_ARGS & kwargs.keys())
    if reserved:
        raise bad_field("chat_template_kwargs", f"chat_template_kwargs may not set {reserved}.")
    return kwargs


def parse_chat(body: dict, tokenizer, trust_request_template: bool = False,
               max_chars: int | None = None, tool_parser="auto") -> ParsedRequest:
    """``tool_parser``: the model's tool-call format (a parser class), None for a model
    without one, or "auto" to read it off the tokenizer's chat template."""
    try:
        messages = normalize_messages(body.get("messages"))
    except ValueError as e:
        raise bad_field("messages", str(e)) from e
    chars = sum(len(m["content"]) for m in messages)
    if max_chars is not None and chars > max_chars:
        raise bad_field("messages", f"messages hold {chars} characters, more than this server "
                                    f"takes (max_prompt_chars={max_chars}).")
    if tool_parser == "auto":
        tool_parser = detect_parser(getattr(tokenizer, "chat_template", None))
    try:
        tools = parse_tools(body, tool_parser)
    except ToolsError as e:
        raise bad_field(e.param, str(e)) from e
    template_args = chat_template_args(body, trust_request_template)
    if tools is not None:
        template_args["tools"] = tools.tools
    render = functools.partial(
        _render, tokenizer, messages, field(body, "add_generation_prompt", "bool", True),
        template_args, max_chars)
    want_logprobs = field(body, "logprobs", "bool", False)
    top = field(body, "top_logprobs", "int")
    if top is not None and not 0 <= top <= 20:
        raise bad_field("top_logprobs", "'top_logprobs' must be between 0 and 20.")
    if top and not want_logprobs:
        raise bad_field("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
    max_tokens = field(body, "max_completion_tokens", "int", field(body, "max_tokens", "int"))
    asked = _prompt_logprobs(body)
    params = sampling_params(body, max_tokens, (top or 0) if want_logprobs else None, asked,
                             tools.constraint() if tools is not None else None)
    return ParsedRequest([render], params, field(body, "stream", "bool", False),
                         stream_options(body), prompt_logprobs=asked is not None, tools=tools)


def _render(tokenizer, messages, add_generation_prompt, kwargs, max_chars) -> dict:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt, kwargs, max_chars)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a failing template is the request's fault
        raise ValueError(f"the chat template failed on these messages: {e}") from e


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(out: CompletionOutput) -> str | None:
    return {"abort": "stop"}.get(out.finish_reason, out.finish_reason)


# ---- logprobs --------------------------------------------------------------------------
class TokenText:
    """Token strings and raw bytes for logprobs (byte-level BPE tokens map back to bytes)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_decoder = _byte_decoder()

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and all(c in self.byte_decoder for c in piece):
            return [self.byte_decoder[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _ranked(entry: dict, n: int):
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= n), key=lambda x: x[1].rank)


def vllm_prompt_logprobs(entries: list | None) -> list | None:
    """vLLM's prompt_logprobs: None, then per prompt token {id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                             "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def echo_logprobs(tt: TokenText, prompt_ids: list[int], entries: list | None,
                  top_n: int) -> dict:
    """The echoed prompt's part of completions logprobs (the first token has none)."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for k, tid in enumerate(prompt_ids):
        text = tt.text(tid)
        entry = entries[k] if entries is not None and k < len(entries) else None
        tokens.append(text)
        values.append(None if entry is None else entry[tid].logprob)
        tops.append(None if entry is None else
                    {tt.text(t): v.logprob for t, v in _ranked(entry, top_n)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], top_n: int) -> dict:
    content = []
    for tid, entry in zip(token_ids, entries):
        lp = entry[tid]
        content.append({
            "token": tt.text(tid), "logprob": lp.logprob, "bytes": tt.bytes(tid),
            "top_logprobs": [{"token": tt.text(t), "logprob": v.logprob, "bytes": tt.bytes(t)}
                             for t, v in _ranked(entry, top_n)],
        })
    return {"content": content}


def completion_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], top_n: int,
                        offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        text = tt.text(tid)
        tokens.append(text)
        values.append(entry[tid].logprob)
        tops.append({tt.text(t): v.logprob for t, v in _ranked(entry, top_n)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
