"""What a request's output must match (vLLM's ``StructuredOutputsParams``): plain data,
checked for shape here; whether the engine can enforce it (unsupported schema keywords,
bad regexes or grammars) is the grammar backend's call, made before the request queues."""
from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar as text


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | bool | None = None  # a JSON schema (object or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, "
                             f"regex, choice, grammar; got {given or 'none'}.")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object).")
            object.__setattr__(self, "json", schema)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings.")
            object.__setattr__(self, "choice", tuple(self.choice))
        if len(self.key()[1]) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs is over {MAX_SPEC_CHARS} characters.")

    @property
    def kind(self) -> str:
        return self.key()[0]

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints share one compiled grammar."""
        if self.json is not None:
            return "json", json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar

    @classmethod
    def from_dict(cls, value) -> "StructuredOutputsParams":
        """vLLM's ``structured_outputs`` request field: {"json" | "json_object" | "regex" |
        "choice" | "grammar": ...}; other keys are refused by name."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be an object.")
        known = {"json", "json_object", "regex", "choice", "grammar"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs does not support {unknown}.")
        fields = {k: v for k, v in value.items() if v is not None}
        if "json_object" in fields and not isinstance(fields["json_object"], bool):
            raise ValueError("structured_outputs.json_object must be true or false.")
        return cls(**fields)
