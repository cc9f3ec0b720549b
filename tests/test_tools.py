"""Tool calling: the parsers fed one character at a time (no model), the shipped SmolLM2
template, request checks, and grammar-forced calls in the Hermes format on the bundled
model. The OpenAI API end to end is in test_server.py."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engine import SamplingParams
from engine.tokenizer import normalize_messages
from server import protocol as P
from server.tools.parsers import (HermesParser, SmolLM2Parser, detect_parser, parse_all,
                                  parser_for)
from server.tools.request import ToolRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}


def stream(parser_cls, text: str, sizes) -> tuple[str, list[dict], list[dict]]:
    """Feed ``text`` in pieces of the given sizes (cycled): (content, calls, raw deltas)."""
    parser, content, calls, deltas, i = parser_cls(), "", {}, [], 0
    sizes = iter(sizes * (len(text) + 1))
    pieces = []
    while i < len(text):
        n = next(sizes)
        pieces.append(text[i:i + n])
        i += n
    for out in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += out.content
        for d in out.tool_calls:
            deltas.append(d)
            if "id" in d:  # a call starts: id, type and name come first, arguments empty
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert d["index"] in calls, "arguments before the call's name"
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[k] for k in sorted(calls)], deltas


def whole(parser_cls, text: str) -> tuple[str, list[dict]]:
    content, calls = parse_all(parser_cls(), text)
    return content, [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in calls]


HERMES_TWO = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris \\"Ville\\" </tool_call> {", "unit": "celsius"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
SMOL_TWO = ('<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Oslo", "n": [1, '
            '{"x": "]}"}]}},\n{"arguments": {"city": "Rome"}, "name": "get_time"}\n]</tool_call>')


@pytest.mark.parametrize("parser_cls,text,content,calls", [
    (HermesParser, HERMES_TWO, "Let me look that up.\n", [
        ("get_weather", '{"city": "Paris \\"Ville\\" </tool_call> {", "unit": "celsius"}'),
        ("get_time", "{}")]),
    (SmolLM2Parser, SMOL_TWO, "", [
        ("get_weather", '{"city": "Oslo", "n": [1, {"x": "]}"}]}'),
        ("get_time", '{"city": "Rome"}')]),
    (SmolLM2Parser, "<tool_call>[]</tool_call>", "", []),  # SmolLM2's "no call needed"
    (HermesParser, "No tools needed: 2 < 3 and <tool is not a tag.",
     "No tools needed: 2 < 3 and <tool is not a tag.", []),
    (HermesParser, '<tool_call>\n{"name": "f"}\n</tool_call>', "", [("f", "{}")]),
    (HermesParser, '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "",
     [("f", '{"a": 1}')]),  # arguments sent as a JSON string
    (HermesParser, "<tool_call>\nnot json\n</tool_call> after",
     "<tool_call>\nnot json\n</tool_call> after", []),  # not a call: the text is kept
    (HermesParser, '<tool_call>\n{"name": "f", "arguments": {"a": "x', "",
     [("f", '{"a": "x')]),  # cut off (length): what came so far
    (HermesParser, '<tool_call>\n{"na', '<tool_call>\n{"na', []),  # cut off before a name
])
def test_parsers_fed_in_any_pieces_agree_with_the_whole_text(parser_cls, text, content, calls):
    want = (content, [{"name": n, "arguments": a} for n, a in calls])
    assert whole(parser_cls, text) == want
    rng = random.Random(0)
    for sizes in ([1], [2], [3, 1], [7], [len(text)], [rng.randint(1, 5) for _ in range(50)]):
        got_content, got_calls, _ = stream(parser_cls, text, sizes)
        assert (got_content, got_calls) == want, sizes


def test_streamed_deltas_name_first_then_argument_fragments():
    _, calls, deltas = stream(SmolLM2Parser, SMOL_TWO, [1])
    starts = [d for d in deltas if "id" in d]
    assert [d["function"]["name"] for d in starts] == ["get_weather", "get_time"]
    assert len({d["id"] for d in starts}) == 2
    first_args = [d for d in deltas if d["index"] == 0 and "id" not in d]
    assert len(first_args) > 5  # the arguments streamed as they came, not at the end
    assert all(json.loads(c["arguments"]) for c in calls)


def test_whitespace_between_calls_is_not_content():
    text = HERMES_TWO.split("<tool_call>", 1)[1]
    content, calls = whole(HermesParser, "<tool_call>" + text + "\n\n")
    assert content == "" and len(calls) == 2


def test_parser_choice_from_template_and_flag():
    assert detect_parser("... <tool_call>\n{{ call | tojson }}\n</tool_call>") is HermesParser
    assert detect_parser("... <tool_call>[\n ...") is SmolLM2Parser
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None
    assert parser_for("none", "<tool_call>") is None
    assert parser_for("hermes", None) is HermesParser
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        parser_for("mistral", None)


# ---- the shipped SmolLM2 template -------------------------------------------------------
def test_shipped_smollm2_template_renders_as_the_original_without_tools(smol_llm):
    tok = smol_llm.engine.tokenizer
    assert "<tool_call>[" in tok.chat_template and detect_parser(tok.chat_template) is SmolLM2Parser
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    for conv in convs:
        for gen in (True, False):
            ours = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            theirs = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                             chat_template=tok.original_chat_template)
            assert ours == theirs


def test_tools_and_a_multi_turn_tool_conversation_render(smol_llm):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    text = smol_llm.render_chat(conv, chat_template_kwargs={"tools": [WEATHER]})["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou are an expert in composing")
    assert f"<tools>{json.dumps([WEATHER])}</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>[\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n]</tool_call><|im_end|>\n') in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("message,needle", [
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "tool_calls[0].function.arguments is not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "must be a JSON object"),
    ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "tool_calls[0] must be"),
    ({"role": "user", "content": "x", "tool_calls": []}, "on an assistant message"),
])
def test_bad_tool_call_history_is_refused(message, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        normalize_messages([{"role": "user", "content": "q"}, message])


# ---- request checks (no model run) ------------------------------------------------------
def chat(tokenizer, **body) -> P.ParsedRequest:
    return P.parse_chat({"messages": [{"role": "user", "content": "q"}], **body}, tokenizer)


@pytest.mark.parametrize("body,param,needle", [
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be none, auto"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "a second function named"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "1-64"),
    ({"tools": {"get_weather": {}}}, "tools", "must be a list"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
])
def test_bad_tool_requests_are_400_naming_the_field(smol_llm, body, param, needle):
    with pytest.raises(P.APIError) as e:
        chat(smol_llm.engine.tokenizer, **body)
    assert e.value.status == 400 and e.value.param == param and needle in e.value.message


def test_tool_choice_decides_prompt_parser_and_grammar(smol_llm):
    tok = smol_llm.engine.tokenizer
    auto = chat(tok, tools=[WEATHER])
    assert auto.tools.choice == "auto" and auto.params.structured_outputs is None
    assert "<tools>" in auto.prompts[0]()["prompt"]
    none = chat(tok, tools=[WEATHER], tool_choice="none")
    assert none.tools is None and "<tools>" not in none.prompts[0]()["prompt"]
    named = chat(tok, tools=[WEATHER, NOW],
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    grammar = named.params.structured_outputs.grammar
    assert '"const": "get_time"' in grammar and "get_weather" not in grammar
    with pytest.raises(P.APIError, match="no tool-call format"):
        P.parse_chat({"messages": [{"role": "user", "content": "q"}], "tools": [WEATHER]},
                     tok, tool_parser=None)


# ---- forced calls on the bundled model ---------------------------------------------------
@pytest.mark.parametrize("parser_cls", [HermesParser, SmolLM2Parser])
def test_forced_calls_parse_and_validate_in_each_format(smol_llm, parser_cls):
    """The grammar of each family's format, on SmolLM2: required with parallel calls off
    gives exactly one call, named gives that function; the arguments validate."""
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    prompt = smol_llm.render_chat(messages, chat_template_kwargs={"tools": [WEATHER, NOW]})
    cases = [("required", None, False), ("function", "get_time", True),
             ("function", "get_weather", True)]
    requests = [ToolRequest([WEATHER, NOW], kind, name, parallel, parser_cls)
                for kind, name, parallel in cases]
    params = [SamplingParams(temperature=0.0, max_tokens=60,
                             structured_outputs=r.constraint()) for r in requests]
    outs = smol_llm.generate([prompt] * len(params), params, use_tqdm=False)
    schemas = {"get_weather": WEATHER["function"]["parameters"],
               "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}
    for (kind, name, _), out in zip(cases, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        content, calls = whole(parser_cls, c.text)
        assert content == "" and len(calls) == 1, c.text
        assert name is None or calls[0]["name"] == name
        jsonschema.validate(json.loads(calls[0]["arguments"]), schemas[calls[0]["name"]])
