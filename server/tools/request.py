"""The request side of tool calling: OpenAI ``tools`` / ``tool_choice`` /
``parallel_tool_calls`` checked, and the grammar that makes ``required`` and a named
choice hold, in the model's own tag format."""
from __future__ import annotations

import re
from dataclasses import dataclass

from engine.core.structured_outputs import StructuredOutputsParams

from .parsers import ToolCallParser

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# The call JSON as the families were trained to write it ({"name": "f", "arguments": {...}}),
# with no free whitespace: a model cannot pad a forced call until max_tokens.
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolsError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolRequest:
    tools: list[dict]  # as sent (checked): what the chat template renders
    choice: str  # auto | required | function
    function: str | None  # the named function (choice == "function")
    parallel: bool
    parser: type[ToolCallParser]

    def functions(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar that forces a call (required, named); None for auto."""
        if self.choice == "auto":
            return None
        fns = self.functions()
        if self.choice == "function":
            fns = {self.function: fns[self.function]}
        options = [_call_schema(name, fn) for name, fn in fns.items()]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        schema["x-guidance"] = _CALL_JSON
        parallel = self.parallel and self.choice == "required"
        return StructuredOutputsParams(grammar=self.parser.grammar(schema, parallel))


def _call_schema(name: str, fn: dict) -> dict:
    params = fn.get("parameters")
    if not params:  # no parameters: the arguments are {}
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tools(body: dict, parser: type[ToolCallParser] | None) -> ToolRequest | None:
    """The request's tool calling, or None when it has none (no tools, or tool_choice
    "none": then the tools are not rendered into the prompt either)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ToolsError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ToolsError("tool_choice", "'tool_choice' needs 'tools'.")
        return None
    names = _check_tools(tools)
    kind, function = _check_choice(choice, names)
    if kind == "none":
        return None
    if parser is None:
        raise ToolsError("tools", "this model's chat template has no tool-call format; start "
                                  "the server with --tool-call-parser (hermes or smollm2) and "
                                  "a --chat-template that renders tools.")
    return ToolRequest(tools, kind, function, parallel, parser)


def _check_tools(tools) -> list[str]:
    if not isinstance(tools, list):
        raise ToolsError("tools", "'tools' must be a list of {'type': 'function', "
                                  "'function': {...}} objects.")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn, dict):
            raise ToolsError("tools", f"tools[{i}] must be {{'type': 'function', "
                                      f"'function': {{'name', 'parameters'}}}}.")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolsError("tools", f"tools[{i}].function.name must be 1-64 letters, digits, "
                                      f"'_' or '-', got {name!r:.80}.")
        if name in names:
            raise ToolsError("tools", f"tools[{i}]: a second function named {name!r}.")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolsError("tools", f"tools[{i}].function.parameters must be a JSON schema "
                                      f"object.")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolsError("tools", f"tools[{i}].function.description must be a string.")
        names.append(name)
    return names


def _check_choice(choice, names: list[str]) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolsError("tool_choice", "'tool_choice' must be none, auto, required or "
                                        "{'type': 'function', 'function': {'name': ...}}.")
    if fn["name"] not in names:
        raise ToolsError("tool_choice", f"tool_choice names {fn['name']!r:.80}, which is not "
                                        f"among the tools.")
    return "function", fn["name"]
