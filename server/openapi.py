"""The server's OpenAPI 3.0.3 document (served at ``GET /openapi.json``).

Built as a plain dict. Request bodies list the fields the server reads (see protocol.py,
app.py's ``triton_request`` and kserve/contract.py) with the limits it enforces; unknown fields are ignored, so the
request objects stay open. Response bodies are described loosely (OpenAI's shapes).
"""
from __future__ import annotations

import copy

REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _int(description: str | None = None, *, nullable: bool = True, **limits) -> dict:
    return _prop({"type": "integer", **limits}, description, nullable)


def _num(description: str | None = None, *, nullable: bool = True, **limits) -> dict:
    return _prop({"type": "number", **limits}, description, nullable)


def _bool(description: str | None = None) -> dict:
    return _prop({"type": "boolean"}, description, True)


def _prop(schema: dict, description: str | None, nullable: bool) -> dict:
    if description:
        schema["description"] = description
    if nullable:  # null means "use the default", as if the field were absent
        schema["nullable"] = True
    return schema


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_TOKEN_ID = {"type": "integer", "minimum": 0}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": 1024}
_FN_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}

SCHEMAS: dict = {
    # ---- requests ----------------------------------------------------------------------
    "SamplingFields": {
        "type": "object",
        "description": "Sampling fields shared by every generate route. null = the default.",
        "properties": {
            "user": {"type": "string", "description": "The routing key: a registry model's "
                                                      "version is picked by its stable hash."},
            "max_tokens": _int("Tokens to generate (default: 16 for completions, the rest of "
                               "the context for chat, 64 for Triton).", minimum=1),
            "temperature": _num("0 (or below 1e-5) is greedy.", minimum=0, maximum=100),
            "top_p": _num(minimum=0, exclusiveMinimum=True, maximum=1),
            "top_k": _int("-1 or 0 disables; otherwise 1..vocabulary size.", minimum=-1),
            "min_p": _num(minimum=0, maximum=1),
            "n": _int("Choices per prompt.", minimum=1, maximum=128),
            "seed": _int(minimum=-(2 ** 63), maximum=2 ** 64 - 1),
            "presence_penalty": _num(minimum=-2, maximum=2),
            "frequency_penalty": _num(minimum=-2, maximum=2),
            "repetition_penalty": _num(minimum=0.01, maximum=100),
            "stop": {"oneOf": [_STOP_STRING,
                               {"type": "array", "maxItems": 64, "items": _STOP_STRING}],
                     "nullable": True,
                     "description": "Up to 64 non-empty strings of at most 1024 characters."},
            "stop_token_ids": {"type": "array", "maxItems": 1024, "items": _TOKEN_ID,
                               "nullable": True},
            "ignore_eos": _bool(),
            "min_tokens": _int("At most max_tokens.", minimum=0),
            "skip_special_tokens": _bool(),
            "include_stop_str_in_output": _bool(),
            "logit_bias": {"type": "object", "nullable": True, "maxProperties": 1024,
                           "additionalProperties": {"type": "number", "minimum": -100,
                                                    "maximum": 100},
                           "description": "Token id (as a string key) -> bias added to its "
                                          "logit; -100 bans, +100 forces."},
            "best_of": _int("Only 1 (or null) is accepted.", minimum=1, maximum=1),
            "prompt_logprobs": _int("vLLM: top-N logprobs at every prompt position (the "
                                    "request then computes its whole prompt); a stream carries them once, on its "
                                    "first chunk with text.",
                                    minimum=0, maximum=20),
            "response_format": {
                "type": "object", "nullable": True, "required": ["type"],
                "description": "OpenAI: text, json_object, or json_schema "
                               "({json_schema: {name, schema, strict}}); enforced by grammar.",
                "properties": {"type": {"type": "string",
                                        "enum": ["text", "json_object", "json_schema"]},
                               "json_schema": {"type": "object", "properties": {
                                   "name": {"type": "string"}, "schema": {"type": "object"},
                                   "strict": {"type": "boolean", "nullable": True}}}}},
            "structured_outputs": {
                "type": "object", "nullable": True,
                "description": "vLLM: exactly one of json (a schema), json_object, regex, "
                               "choice, grammar (Lark).",
                "properties": {"json": {"type": "object"}, "json_object": {"type": "boolean"},
                               "regex": {"type": "string"},
                               "choice": {"type": "array", "items": {"type": "string"}},
                               "grammar": {"type": "string"}}},
        },
    },
    "StreamOptions": {"type": "object", "nullable": True,
                      "properties": {"include_usage": _bool(),
                                     "continuous_usage_stats": _bool("Usage on every chunk.")}},
    "Prompt": {
        "description": "A string, strings, token ids, or lists of token ids (one request each).",
        "oneOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "items": _TOKEN_ID},
            {"type": "array", "minItems": 1,
             "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID}},
        ],
    },
    "CompletionRequest": {"allOf": [_ref("SamplingFields"), {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "model": {"type": "string", "nullable": True},
            "prompt": _ref("Prompt"),
            "logprobs": _int("Top log-probabilities per token.", minimum=0, maximum=20),
            "echo": _bool("Prefix each choice with its prompt."),
            "return_token_ids": _bool("vLLM's: add prompt_token_ids and token_ids to each "
                                      "choice (streamed: the new ids in each chunk)."),
            "stream": _bool(),
            "stream_options": _ref("StreamOptions"),
        },
    }]},
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "description": "system, user, assistant, ..."},
            "content": {"nullable": True, "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {
                    "type": "object", "required": ["type"],
                    "properties": {"type": {"type": "string", "enum": ["text"]},
                                   "text": {"type": "string"}}}},
            ]},
            "tool_calls": {"type": "array", "nullable": True, "description": "An assistant "
                           "turn's calls; function.arguments is a JSON object as a string.",
                           "items": {"type": "object", "required": ["function"], "properties": {
                               "id": {"type": "string"},
                               "type": {"type": "string", "enum": ["function"]},
                               "function": {"type": "object", "required": ["name", "arguments"],
                                            "properties": {"name": {"type": "string"},
                                                           "arguments": {"type": "string"}}}}}},
            "tool_call_id": {"type": "string", "description": "A tool turn's call id."},
        },
    },
    "ChatRequest": {"allOf": [_ref("SamplingFields"), {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "model": {"type": "string", "nullable": True},
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_completion_tokens": _int("Overrides max_tokens.", minimum=1),
            "logprobs": _bool("Return log-probabilities of the sampled tokens."),
            "top_logprobs": _int("Needs logprobs: true.", minimum=0, maximum=20),
            "stream": _bool(),
            "stream_options": _ref("StreamOptions"),
            "add_generation_prompt": _bool(),
            "chat_template_kwargs": {"type": "object", "nullable": True,
                                     "description": "Extra variables for the chat template."},
            "tools": {"type": "array", "nullable": True, "items": _ref("Tool"),
                      "description": "Functions the model may call (rendered by the chat "
                                     "template; calls parsed into message.tool_calls)."},
            "tool_choice": {"nullable": True, "description": "none, auto (default), required "
                                                            "or one function by name.",
                            "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                                      {"type": "object", "required": ["type", "function"],
                                       "properties": {
                                           "type": {"type": "string", "enum": ["function"]},
                                           "function": {"type": "object", "required": ["name"],
                                                        "properties": {"name": _FN_NAME}}}}]},
            "parallel_tool_calls": _bool("false: at most one call per turn."),
        },
    }]},
    "Tool": {
        "type": "object", "required": ["type", "function"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": _FN_NAME, "description": {"type": "string"},
                "parameters": {"type": "object", "description": "A JSON schema."},
                "strict": {"type": "boolean", "nullable": True}}}},
    },
    "TritonGenerateRequest": {"allOf": [_ref("SamplingFields"), {
        "type": "object",
        "required": ["text_input"],
        "description": "Sampling fields go at the top level or under parameters (top level wins).",
        "properties": {
            "text_input": {"type": "string"},
            "parameters": {"allOf": [_ref("SamplingFields")], "nullable": True,
                           "description": "Sampling fields; stop_words is stop's alias."},
            "stop_words": {"oneOf": [_STOP_STRING,
                                     {"type": "array", "maxItems": 64, "items": _STOP_STRING}],
                           "nullable": True, "description": "Alias of stop."},
        },
    }]},
    # ---- responses ---------------------------------------------------------------------
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }},
    },
    "Usage": {"type": "object", "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"}}},
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "description": "object is text_completion or chat.completion; choices carry text "
                       "(completions) or message (chat), logprobs and finish_reason.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _ref("Usage"),
        },
    },
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"},
            "created": {"type": "integer"}, "owned_by": {"type": "string"},
            "max_model_len": {"type": "integer"}, "root": {"type": "string"},
            "parent": {"type": "string", "nullable": True,
                       "description": "The base model, for a LoRA adapter."}}}}}},
    "TritonModel": {"type": "object", "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"}, "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}},
    "TritonGenerateResponse": {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "text_output": {"type": "string"}}},
    # ---- KServe v2 (Open Inference Protocol) ---------------------------------------------
    "InferInput": {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": [
                "text_input", "stream", "sampling_parameters", "exclude_input_in_output",
                "return_finish_reason", "return_cumulative_logprob", "return_logprobs",
                "return_num_input_tokens", "return_num_output_tokens"]},
            "datatype": {"type": "string", "enum": ["BYTES", "BOOL", "INT32", "FP32"]},
            "shape": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "maxItems": 4},
            "parameters": {"type": "object", "nullable": True,
                           "description": "binary_data_size: the input's bytes follow the "
                                          "JSON header (binary tensor extension)."},
        },
    },
    "InferRequest": {
        "type": "object", "required": ["inputs"],
        "description": "Inputs as Triton's vLLM backend names them; BYTES as strings, BOOL "
                       "as true/false. With Inference-Header-Content-Length the body is "
                       "this JSON followed by binary tensor data.",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"allOf": [_ref("SamplingFields"), {"type": "object", "properties": {
                "binary_data_output": _bool("Every output as binary data."),
                "timeout": _int("Microseconds before the request is aborted.", minimum=0)}}],
                "nullable": True},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 10,
                       "items": _ref("InferInput")},
            "outputs": {"type": "array", "maxItems": 6, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "enum": [
                    "text_output", "finish_reason", "cumulative_logprob", "logprobs",
                    "num_input_tokens", "num_output_tokens"]},
                    "parameters": {"type": "object", "nullable": True, "properties": {
                        "binary_data": _bool()}}}}},
        },
    },
    "InferResponse": {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": {"type": "object"}}}},
    "V2Error": {"type": "object", "required": ["error"],
                "properties": {"error": {"type": "string"}}},
    "RepositoryLoad": {"type": "object", "properties": {"parameters": {
        "type": "object", "description": "Triton's load parameters. A full version takes "
        "'path' (HF directory or .gguf), a LoRA version 'lora' and 'base' (\"1\" or "
        "\"model:1\"); these may also sit in 'config' (JSON), with engine settings.",
        "properties": {"version": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"},
                       "path": {"type": "string"}, "lora": {"type": "string"},
                       "base": {"type": "string"}, "weight": {"type": "number", "minimum": 0},
                       "config": {"type": "string"}}}}},
    "RepositoryUnload": {"type": "object", "properties": {"parameters": {
        "type": "object", "properties": {"version": {
            "type": "string", "pattern": "^[1-9][0-9]{0,8}$",
            "description": "The version to drain and free (default: every version)."}}}}},
    "Traffic": {"type": "object", "description": "Relative weights by version, e.g. "
                "{\"1\": 99, \"2\": 1}.", "additionalProperties": {"type": "number",
                                                                   "minimum": 0}},
}

_ERRORS = {
    "400": "Bad field, over-long prompt or invalid JSON.",
    "401": "Missing or wrong API key (when the server runs with --api-key).",
    "403": "The admin API is off (start the server with --admin-key).",
    "404": "Unknown model.",
    "409": "The version's state does not allow it (loaded, loading, a base of others, or "
           "carrying all of its model's traffic).",
    "413": "Request body over --max-body-bytes.",
    "503": "Waiting queue full (with Retry-After) or engine dead.",
    "504": "Past --request-timeout; the request was aborted.",
}
RESPONSES: dict = {code: _json(_ref("Error"), text) for code, text in _ERRORS.items()}
RESPONSES.update({f"v2-{code}": _json(_ref("V2Error"), text) for code, text in _ERRORS.items()})
_SSE = {"text/event-stream": {"schema": {
    "type": "string", "description": "data: <JSON chunk> events (errors in the Error shape)."}}}


def _errors(*codes: str) -> dict:
    return {code: {"$ref": "#/components/responses/" + code} for code in codes}


def _generate(summary: str, request: str, response: str, stream: str) -> dict:
    """A POST that generates: JSON body in, JSON (or SSE) out, every error status possible."""
    ok = _json(_ref(response), "Generated text (JSON, or SSE when streamed).")
    if stream == "optional":
        ok["content"].update(_SSE)
    elif stream == "always":
        ok = {"description": "SSE: one data event per text delta.", "content": dict(_SSE)}
    return {
        "summary": summary,
        "security": [{"bearerAuth": []}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": ok, **_errors("400", "401", "404", "413", "503", "504")},
    }


def _v2(summary: str, ok: dict, *errors: str, secured: bool = True, body: str | None = None,
        method: str = "get") -> dict:
    """A KServe v2 route: errors are {"error": "message"}, as the protocol says."""
    op = {"summary": summary, "responses": {
        "200": ok, **{c: {"$ref": "#/components/responses/v2-" + c} for c in errors}}}
    if secured:
        op["security"] = [{"bearerAuth": []}]
    if body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(body)}}}
    return {method: op}


def _get(summary: str, ok: dict, *errors: str, secured: bool = False) -> dict:
    op = {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}
    if secured:
        op["security"] = [{"bearerAuth": []}]
    return op


def openapi_document(served_model_name: str, version: str | None = None) -> dict:
    if version is None:
        from .app import VERSION as version  # lazy: app.py imports this module lazily too

    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string"}, "example": served_model_name,
                   "description": f"The served model's name ({served_model_name})."}
    version_param = {"name": "version", "in": "path", "required": True,
                     "schema": {"type": "string"}, "example": "1",
                     "description": "The model version (1)."}
    health = _get("200 while the engine loop runs.", {"description": "Healthy (empty body)."},
                  "503")
    paths = {
        "/v1/completions": {"post": _generate("Text completion (OpenAI).", "CompletionRequest",
                                              "Completion", "optional")},
        "/v1/chat/completions": {"post": _generate("Chat completion (OpenAI).", "ChatRequest",
                                                   "Completion", "optional")},
        "/v1/models": {"get": _get("The served model.",
                                   _json(_ref("ModelList"), "One model."), "401", secured=True)},
        **{f"/v1/{verb}_lora_adapter": {"post": {
            "summary": f"vLLM's runtime LoRA {verb} (needs --allow-runtime-lora-updates; 404 "
                       f"otherwise).",
            "security": [{"bearerAuth": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["lora_name"] + (["lora_path"] if verb == "load"
                                                               else []),
                "properties": {"lora_name": {"type": "string"},
                               "lora_path": {"type": "string"}}}}}},
            "responses": {"200": {"description": "Done.", "content": {
                "text/plain": {"schema": {"type": "string"}}}},
                **_errors("400", "401", "404", "503")}}} for verb in ("load", "unload")},
        "/tokenize": {"post": {
            "summary": "vLLM's /tokenize: a prompt, or chat messages through the template.",
            "security": [{"bearerAuth": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "model": {"type": "string", "nullable": True},
                    "prompt": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                    "add_special_tokens": _bool(), "add_generation_prompt": _bool()}}}}},
            "responses": {"200": _json({"type": "object", "properties": {
                "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                "tokens": {"type": "array", "items": {"type": "integer"}}}}, "Token ids."),
                **_errors("400", "401", "404", "503")}}},
        "/detokenize": {"post": {
            "summary": "vLLM's /detokenize: token ids to text.",
            "security": [{"bearerAuth": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["tokens"], "properties": {
                    "model": {"type": "string", "nullable": True},
                    "tokens": {"type": "array", "items": _TOKEN_ID}}}}}},
            "responses": {"200": _json({"type": "object", "properties": {
                "prompt": {"type": "string"}}}, "Text."), **_errors("400", "401", "404", "503")}}},
        "/health": {"get": health},
        "/metrics": {"get": _get("Prometheus metrics.", {
            "description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/version": {"get": _get("Server version.", _json(
            {"type": "object", "properties": {"version": {"type": "string"}}}, "Version."))},
        "/v2": _v2("KServe v2 server metadata.", _json({"type": "object"}, "Metadata."),
                   secured=False),
        "/v2/health/live": _v2("200 while the process runs.", {"description": "Live."},
                               secured=False),
        "/v2/health/ready": _v2("200 while the engine loop runs.", {"description": "Ready."},
                                "503", secured=False),
        "/v2/models/stats": _v2("Triton statistics of every loaded model version.", _json(
            {"type": "object", "properties": {"model_stats": {"type": "array", "items": {
                "type": "object"}}}}, "Statistics."), "401"),
        "/v2/repository/index": _v2("The served models.", _json(
            {"type": "array", "items": {"type": "object"}}, "Models."), "401", method="post"),
        **{base + tail: {"parameters": [model_param] + ([version_param] if "{version}" in base
                                                        else []), **op}
           for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
           for tail, op in (
               ("", _v2("KServe v2 model metadata (inputs, outputs).",
                        _json(_ref("TritonModel"), "Metadata."), "401", "404")),
               ("/ready", _v2("200 when the model can serve.", {"description": "Ready."},
                              "401", "404", "503")),
               ("/config", _v2("Triton model configuration.", _json({"type": "object"},
                                                                     "Config."), "401", "404")),
               ("/stats", _v2("Triton statistics (requests, durations in ns) of the model's "
                              "versions, or of one.", _json({"type": "object", "properties": {
                                  "model_stats": {"type": "array", "items": {
                                      "type": "object"}}}}, "Statistics."), "401", "404")),
               ("/infer", _v2("KServe v2 inference (unary).", _json(
                   _ref("InferResponse"), "Outputs (JSON, or binary after the JSON header)."),
                   "400", "401", "404", "413", "503", "504", body="InferRequest",
                   method="post")),
           )},
        "/v2/models/{model}/generate": {
            "parameters": [model_param],
            "post": _generate("Triton generate.", "TritonGenerateRequest",
                              "TritonGenerateResponse", "never"),
        },
        "/v2/models/{model}/generate_stream": {
            "parameters": [model_param],
            "post": _generate("Triton generate, streamed (SSE of text_output deltas).",
                              "TritonGenerateRequest", "TritonGenerateResponse", "always"),
        },
        **{f"/v2/models/{{model}}/versions/{{version}}/{tail}": {
            "parameters": [model_param, version_param],
            "post": _generate(f"Triton generate{extra}, on a pinned version.",
                              "TritonGenerateRequest", "TritonGenerateResponse", stream)}
           for tail, extra, stream in (("generate", "", "never"),
                                       ("generate_stream", ", streamed", "always"))},
        "/v2/repository/models/{model}/load": {
            "parameters": [model_param],
            **_v2("Load a version (returns once READY; new versions start with no traffic). "
                  "Admin key only.", _json({"type": "object"}, "Loaded."),
                  "400", "401", "403", "409", method="post", body="RepositoryLoad")},
        "/v2/repository/models/{model}/unload": {
            "parameters": [model_param],
            **_v2("Take a version (or all) out of routing: it drains, then frees its engine. "
                  "Admin key only.", _json({"type": "object"}, "Draining."),
                  "400", "401", "403", "404", "409", method="post", body="RepositoryUnload")},
        "/v2/repository/models/{model}/traffic": {
            "parameters": [model_param],
            **_v2("The model's traffic weights by version. Admin key only.",
                  _json(_ref("Traffic"), "Weights."), "401", "403", "404"),
            **_v2("Set the weights (one atomic swap; only READY versions). Admin key only.",
                  _json(_ref("Traffic"), "Weights."), "400", "401", "403", "404",
                  method="put", body="Traffic")},
        "/openapi.json": {"get": _get("This document.", _json({"type": "object"}, "OpenAPI 3.0."))},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "kvserve", "version": version,
                 "description": f"OpenAI-compatible inference server for {served_model_name}. "
                                "Errors use OpenAI's shape (KServe v2 routes: "
                                "{\"error\": message}); /v1/*, /v2/models* and "
                                "/v2/repository need "
                                "'Authorization: Bearer KEY' when started with --api-key."},
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "responses": copy.deepcopy(RESPONSES),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
