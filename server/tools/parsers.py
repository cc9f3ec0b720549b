"""Tool-call parsers: a model's text -> OpenAI content and tool calls, as it streams.

Each model family writes calls in its own tags: Hermes (Qwen2/2.5/3) one JSON object per
``<tool_call>...</tool_call>``, SmolLM2 one JSON list of them in a single tag. A parser is
fed text in whatever pieces the detokenizer yields (tags and escapes may split anywhere)
and returns what became certain: content outside the tags, and per call first its id and
name, then fragments of its arguments. ``arguments`` is the model's own JSON text of the
value, streamed as it grows, so the fragments reassemble to exactly what the non-streamed
response holds (that one is the same parser fed the whole text at once).

The scanner follows JSON strings and escapes, so a ``</tool_call>`` inside an argument
string does not end the call. Text that never became a call (a malformed tag, one cut
off before its name) goes out as content rather than being lost.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"


@dataclass
class ParsedDelta:
    content: str = ""
    # OpenAI delta.tool_calls entries: {"index", "id", "type", "function": {"name",
    # "arguments"}} when a call starts, then {"index", "function": {"arguments"}}.
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: "ParsedDelta") -> None:
        self.content += other.content
        for d in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last["index"] == d["index"] and "id" not in d:
                last["function"]["arguments"] += d["function"]["arguments"]
            else:
                self.tool_calls.append(d)


@dataclass
class _Call:
    index: int = -1  # given when it starts
    name: str | None = None
    args: str | None = None  # raw JSON text of the value, growing while it streams
    args_done: bool = False
    started: bool = False  # id and name sent
    sent: int = 0  # characters of args sent


class _CallScanner:
    """Follows the JSON inside one tag, character by character, and picks out each call
    object's ``name`` and ``arguments`` (``parameters`` too) values as raw text. The tag
    may hold one call object or a list of them, whatever the family's own format."""

    def __init__(self) -> None:
        self.call_depth = 1  # nesting depth inside a call object: 2 inside a list
        self.depth = 0
        self.in_string = self.escape = False
        self.calls: list[_Call] = []  # complete calls, with a name
        self.call: _Call | None = None  # the call object being read
        self.expect = ""  # inside a call: key | colon | value | next
        self.key_raw: str | None = None
        self.key = ""
        self.value: str | None = None  # raw text of the value being read, at call depth
        self.value_kind = ""  # string | container | scalar

    def feed(self, c: str) -> None:
        if self.in_string:
            self._string_char(c)
        elif c in "{[":
            self._open(c)
        elif c in "}]":
            self._close(c)
        elif c == '"':
            self._quote()
        elif self.value is not None:
            if self.value_kind == "scalar" and self.depth == self.call_depth and c == ",":
                self._value_done()
                self.expect = "key"
            else:
                self.value += c
        elif self.call is not None and self.depth == self.call_depth:
            if c == ":" and self.expect == "colon":
                self.expect = "value"
            elif c == "," and self.expect == "next":
                self.expect = "key"
            elif self.expect == "value" and not c.isspace():
                self.value, self.value_kind = c, "scalar"

    def _string_char(self, c: str) -> None:
        if self.key_raw is not None:
            self.key_raw += c
        elif self.value is not None:
            self.value += c
        if self.escape:
            self.escape = False
        elif c == "\\":
            self.escape = True
        elif c == '"':
            self.in_string = False
            if self.key_raw is not None:
                self.key = _loads(self.key_raw, "")
                self.key_raw, self.expect = None, "colon"
            elif self.value_kind == "string" and self.depth == self.call_depth:
                self._value_done()

    def _quote(self) -> None:
        self.in_string = True
        if self.value is not None:
            self.value += '"'
        elif self.call is not None and self.depth == self.call_depth:
            if self.expect == "key":
                self.key_raw = '"'
            elif self.expect == "value":
                self.value, self.value_kind = '"', "string"

    def _open(self, c: str) -> None:
        if self.value is not None:
            self.value += c
        elif self.call is not None and self.depth == self.call_depth and self.expect == "value":
            self.value, self.value_kind = c, "container"
        elif self.depth == 0 and c == "[":
            self.call_depth = 2
        elif c == "{" and self.depth == self.call_depth - 1:
            self.call = _Call()
            self.expect = "key"
        self.depth += 1

    def _close(self, c: str) -> None:
        self.depth -= 1
        if self.value is not None:
            if self.value_kind == "scalar" and self.depth < self.call_depth:
                self._value_done()  # a scalar ends where its object does
            else:
                self.value += c
                if self.value_kind == "container" and self.depth == self.call_depth:
                    self._value_done()
                return
        if self.call is not None and self.depth == self.call_depth - 1:
            self._call_done()

    def _value_done(self) -> None:
        raw, self.value = self.value.rstrip(), None
        self.expect = "next"
        if self.call is None:
            return
        if self.key == "name":
            name = _loads(raw, None)
            self.call.name = name if isinstance(name, str) else None
        elif self.key in ("arguments", "parameters"):
            if raw.startswith('"'):  # arguments written as a JSON-encoded string
                raw = _loads(raw, "")
            self.call.args, self.call.args_done = raw, True

    def _call_done(self) -> None:
        call, self.call = self.call, None
        if call.name is None:
            return  # not a call: the tag's text goes out as content
        if call.args is None:
            call.args = "{}"
        call.args_done = True
        self.calls.append(call)

    def streaming_call(self) -> _Call | None:
        """The call being read, its arguments so far in ``args`` (containers only)."""
        call = self.call
        if call is None:
            return None
        if (self.value is not None and self.key in ("arguments", "parameters")
                and self.value_kind == "container"):
            call.args = self.value
        return call


class ToolCallParser:
    """One choice's text, fed in pieces; ``feed`` and ``finish`` return what is certain."""

    name = ""

    def __init__(self) -> None:
        self.pending = ""  # text that may be the start of a tag (or, inside one, its end)
        self.held_space = ""  # whitespace after a call: dropped if another tag follows
        self.tag: _CallScanner | None = None  # set while inside a tag
        self.tag_text = ""
        self.tag_calls = 0  # calls started inside the current tag
        self.calls: list[_Call] = []  # started calls, by index

    # ---- feeding -----------------------------------------------------------------------
    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        for c in text:
            if self.tag is None:
                self._outside(c, out)
            else:
                self._inside(c, out)
        self._stream_calls(out)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.tag is not None:  # cut off inside a tag
            self._stream_calls(out)
            if not self.tag_calls:
                out.content += self.tag_text
            self.tag = None
        elif not self.calls:
            out.content += self.held_space + self.pending
        self.pending = self.held_space = ""
        return out

    def _outside(self, c: str, out: ParsedDelta) -> None:
        self.pending += c
        if START.startswith(self.pending):
            if self.pending == START:
                self.pending, self.held_space = "", ""
                self.tag, self.tag_text, self.tag_calls = _CallScanner(), START, 0
            return
        text, self.pending = _split_tail(self.pending, START)
        if self.calls and not (self.held_space + text).strip():
            self.held_space += text
            return
        out.content += self.held_space + text
        self.held_space = ""

    def _inside(self, c: str, out: ParsedDelta) -> None:
        self.tag_text += c
        if not self.tag.in_string:
            self.pending += c
            if END.startswith(self.pending):
                if self.pending == END:
                    self._close_tag(out)
                return
            # (the end tag's letters hold no quote: feeding them changes no string state)
            held, self.pending = _split_tail(self.pending, END)
            for ch in held:
                self.tag.feed(ch)
            return
        self.tag.feed(c)

    def _close_tag(self, out: ParsedDelta) -> None:
        self._stream_calls(out)
        body = self.tag_text[len(START):-len(END)].strip()
        if not self.tag_calls and body not in ("", "[]"):
            out.content += self.tag_text  # not a call after all: keep the model's text
        self.tag, self.tag_text, self.pending = None, "", ""

    # ---- what the scanner found --------------------------------------------------------
    def _stream_calls(self, out: ParsedDelta) -> None:
        if self.tag is None:
            return
        for call in self.tag.calls:
            self._send(call, out)
        current = self.tag.streaming_call()
        if current is not None and current.name is not None:
            self._send(current, out, partial=True)

    def _send(self, call: _Call, out: ParsedDelta, partial: bool = False) -> None:
        if not call.started:
            call.started, call.index = True, len(self.calls)
            self.calls.append(call)
            self.tag_calls += 1
            out.tool_calls.append({"index": call.index, "id": f"call_{uuid.uuid4().hex[:24]}",
                                   "type": "function",
                                   "function": {"name": call.name, "arguments": ""}})
        if call.args is None or (partial and not call.args_done and
                                 not call.args.startswith(("{", "["))):
            return
        fragment = call.args[call.sent:]
        if fragment:
            call.sent = len(call.args)
            if out.tool_calls and out.tool_calls[-1]["index"] == call.index:
                out.tool_calls[-1]["function"]["arguments"] += fragment
            else:
                out.tool_calls.append({"index": call.index, "function": {"arguments": fragment}})


class HermesParser(ToolCallParser):
    """Qwen2 / 2.5 / 3 and other Hermes-format models:
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` per call."""

    name = "hermes"

    @staticmethod
    def grammar(call_schema: dict, parallel: bool) -> str:
        more = ' ("\\n" call)*' if parallel else ""
        return (f'start: call{more}\n'
                f'call: "<tool_call>\\n" obj "\\n</tool_call>"\n'
                f'obj: %json {json.dumps(call_schema)}\n')


class SmolLM2Parser(ToolCallParser):
    """SmolLM2-Instruct: ``<tool_call>[\\n{"name": ..., "arguments": {...}},\\n...\\n]</tool_call>``."""

    name = "smollm2"

    @staticmethod
    def grammar(call_schema: dict, parallel: bool) -> str:
        more = ' (",\\n" obj)*' if parallel else ""
        return (f'start: "<tool_call>[\\n" obj{more} "\\n]</tool_call>"\n'
                f'obj: %json {json.dumps(call_schema)}\n')


PARSERS = {p.name: p for p in (HermesParser, SmolLM2Parser)}


def detect_parser(chat_template: str | None) -> type[ToolCallParser] | None:
    """The parser a chat template's own tool format calls for; None if it renders no tools."""
    if not chat_template or START not in chat_template:
        return None
    return SmolLM2Parser if START + "[" in chat_template else HermesParser


def parser_for(name: str, chat_template: str | None) -> type[ToolCallParser] | None:
    """``--tool-call-parser``: auto (from the chat template), none, or a family's name."""
    if name == "auto":
        return detect_parser(chat_template)
    if name == "none":
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose auto, none or one of "
                         f"{', '.join(sorted(PARSERS))}.")
    return PARSERS[name]


def parse_all(parser: ToolCallParser, text: str) -> tuple[str, list[dict]]:
    """The whole text at once: (content, OpenAI message tool_calls)."""
    content, calls = "", {}
    for delta in (parser.feed(text), parser.finish()):
        content += delta.content
        for d in delta.tool_calls:
            call = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function",
                                                 "function": {"name": None, "arguments": ""}})
            if "id" in d:
                call["id"], call["function"]["name"] = d["id"], d["function"]["name"]
            call["function"]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def _split_tail(text: str, tag: str) -> tuple[str, str]:
    """(text, its longest tail that may still grow into ``tag``)."""
    for i in range(len(text)):
        if tag.startswith(text[i:]):
            return text[:i], text[i:]
    return text, ""


def _loads(raw: str, default):
    try:
        return json.loads(raw)
    except ValueError:
        return default
