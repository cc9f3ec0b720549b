"""The LLM's tensor contract, named and meant as in Triton's vLLM backend so that client
code ports unchanged: inputs to a generation job, engine outputs to response tensors.

Differences, all additions: ``text_input`` of shape [N] is a batch of N prompts (outputs
then hold N x n entries, prompt-major); ``sampling_parameters`` keys are checked (an
unknown key is a 400, not ignored); an output named in the request's ``outputs`` is
produced even when its ``return_*`` flag is off."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine import SamplingParams

from .. import protocol as P
from .errors import V2Error
from .tensors import Tensor

# name, datatype, dims (-1: any), optional
INPUTS = [
    ("text_input", "BYTES", [-1], False),
    ("stream", "BOOL", [1], True),
    ("sampling_parameters", "BYTES", [1], True),
    ("exclude_input_in_output", "BOOL", [1], True),
    ("return_finish_reason", "BOOL", [1], True),
    ("return_cumulative_logprob", "BOOL", [1], True),
    ("return_logprobs", "BOOL", [1], True),
    ("return_num_input_tokens", "BOOL", [1], True),
    ("return_num_output_tokens", "BOOL", [1], True),
]
OUTPUTS = [
    ("text_output", "BYTES", [-1]),
    ("finish_reason", "BYTES", [-1]),
    ("cumulative_logprob", "FP32", [-1]),
    ("logprobs", "BYTES", [-1]),
    ("num_input_tokens", "UINT32", [-1]),
    ("num_output_tokens", "UINT32", [-1]),
]
_INPUT_TYPES = {name: dtype for name, dtype, _, _ in INPUTS}
_OUTPUT_NAMES = [name for name, _, _ in OUTPUTS]
_FLAG_OF = {"finish_reason": "return_finish_reason",
            "cumulative_logprob": "return_cumulative_logprob", "logprobs": "return_logprobs",
            "num_input_tokens": "return_num_input_tokens",
            "num_output_tokens": "return_num_output_tokens"}
# Request parameters that belong to the protocol, not to sampling.
_RESERVED = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
             "binary_data_output", "headers"}
SAMPLING_KEYS = {**P.SAMPLING_FIELDS, "max_tokens": "int", "logprobs": "int",
                 "structured_outputs": "structured", "guided_decoding": "structured",
                 "response_format": "structured", "logit_bias": "structured"}
DEFAULT_MAX_TOKENS = 16  # vLLM's SamplingParams default, which the vLLM backend inherits


@dataclass
class InferJob:
    """One parsed infer request."""
    prompts: list[str]
    params: SamplingParams
    stream: bool = False
    prepend_input: bool = True
    outputs: list[str] = field(default_factory=lambda: ["text_output"])
    user_logprobs: bool = False  # the client asked for logprobs (else "null", as vLLM)
    timeout: float | None = None  # seconds, from the request's `timeout` parameter (us)
    id: str = ""
    lora_name: str | None = None  # the vLLM backend's sampling_parameters.lora_name
    model: str = ""  # the model and version the request named (version "": route by weight)
    version: str = ""
    route_key: str | None = None  # x-user-id (header or gRPC metadata): picks the version
    served: object = None  # the registry's Target it ran on (set when it starts)


def parse_job(tensors: list[Tensor], parameters: dict, requested: list[str] | None,
              stream_rpc: bool) -> InferJob:
    """Inputs + request parameters + the names in ``outputs`` -> InferJob. ``stream_rpc``:
    the request came on a transport that can carry several responses."""
    by_name: dict[str, Tensor] = {}
    for t in tensors:
        if t.name not in _INPUT_TYPES:
            raise V2Error.bad(f"unexpected input '{t.name:.100}' (this model takes: "
                              f"{', '.join(_INPUT_TYPES)})")
        if t.name in by_name:
            raise V2Error.bad(f"input '{t.name}' is given twice")
        if t.datatype != _INPUT_TYPES[t.name]:
            raise V2Error.bad(f"input '{t.name}' must be {_INPUT_TYPES[t.name]}, "
                              f"got {t.datatype}")
        if t.name != "text_input" and t.size != 1:
            raise V2Error.bad(f"input '{t.name}' must hold one value, got shape {t.shape}")
        by_name[t.name] = t
    text = by_name.get("text_input")
    if text is None:
        raise V2Error.bad("input 'text_input' is required")
    if text.size == 0:
        raise V2Error.bad("input 'text_input' holds no prompt")
    prompts = []
    for i, raw in enumerate(text.data):
        try:
            prompts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise V2Error.bad(f"input 'text_input'[{i}] is not valid UTF-8: {e}") from e

    def flag(name: str, default: bool = False) -> bool:
        return bool(by_name[name].data[0]) if name in by_name else default

    stream = flag("stream")
    if stream and not stream_rpc:
        raise V2Error.bad("stream=true needs a streaming call (gRPC ModelStreamInfer or "
                          "POST .../generate_stream); this call returns one response")
    exclude = by_name.get("exclude_input_in_output")
    prepend = (not exclude.data[0]) if exclude is not None else not stream
    if prepend and stream:
        raise V2Error.bad("When streaming, `exclude_input_in_output` = False is not allowed.")
    fields = {k: v for k, v in parameters.items()
              if k not in _RESERVED and not k.startswith("triton_")}
    if "sampling_parameters" in by_name:
        fields.update(_json_params(by_name["sampling_parameters"].data[0]))
    lora_name = fields.pop("lora_name", None)
    if lora_name is not None and (not isinstance(lora_name, str) or not lora_name):
        raise V2Error.bad("sampling_parameters: lora_name must be an adapter's name")
    kwargs = _sampling_kwargs(fields)
    kwargs.update(_structured(kwargs))
    if "logit_bias" in kwargs:
        try:
            kwargs["logit_bias"] = P.logit_bias(kwargs["logit_bias"])
        except P.APIError as e:
            raise V2Error.bad(e.message) from e
    user_logprobs = kwargs.get("logprobs") is not None
    outputs = _outputs(requested, {o for o, f in _FLAG_OF.items() if flag(f)})
    if "cumulative_logprob" in outputs and not user_logprobs:
        kwargs["logprobs"] = 0  # the sampled token's logprob only, to sum up
    try:
        params = SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **kwargs})
    except ValueError as e:
        raise V2Error.bad(f"sampling_parameters: {e}") from e
    return InferJob(prompts, params, stream, prepend, outputs, user_logprobs,
                    _timeout(parameters.get("timeout")), lora_name=lora_name)


def _json_params(raw: bytes) -> dict:
    try:
        value = json.loads(raw, parse_constant=P._no_constant)
    except (ValueError, RecursionError) as e:
        raise V2Error.bad(f"input 'sampling_parameters' is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise V2Error.bad("input 'sampling_parameters' must be a JSON object")
    return value


def _sampling_kwargs(fields: dict) -> dict:
    """Checked SamplingParams keyword arguments. Values may come as strings ("0.1"), as the
    vLLM backend accepts; None means the default."""
    unknown = sorted(k for k in fields if k not in SAMPLING_KEYS)
    if unknown:
        raise V2Error.bad(f"unknown sampling parameter(s) {', '.join(unknown)[:200]} "
                          f"(supported: {', '.join(sorted(SAMPLING_KEYS))})")
    kwargs = {}
    for key, value in fields.items():
        if value is not None:
            kwargs[key] = _coerce(key, SAMPLING_KEYS[key], value)
    return kwargs


def _structured(kwargs: dict) -> dict:
    """structured_outputs / guided_decoding (vLLM) / response_format (OpenAI) -> one
    StructuredOutputsParams, checked like the OpenAI routes do."""
    given = {k: kwargs.pop(k) for k in ("structured_outputs", "guided_decoding",
                                        "response_format") if k in kwargs}
    if not given:
        return {}
    if len(given) > 1:
        raise V2Error.bad(f"give one of {', '.join(given)}, not several")
    (name, value), = given.items()
    body = {"structured_outputs" if name == "guided_decoding" else name: value}
    if name == "guided_decoding":
        body["structured_outputs"] = {k: v for k, v in value.items() if k != "backend"}
    try:
        constraint, _ = P.structured_outputs(body)
    except P.APIError as e:
        raise V2Error.bad(f"sampling_parameters: {e.message}") from e
    return {"structured_outputs": constraint} if constraint is not None else {}


def _coerce(key: str, kind: str, value):
    def fail():
        what = "an object (or its JSON text)" if kind == "structured" else kind.replace("_", " ")
        return V2Error.bad(f"sampling parameter '{key}' must be {what}, got {value!r:.80}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise fail() from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail()
    elif kind == "number":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise fail() from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise fail()
    elif kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            value = value.strip().lower() in ("true", "1")
        if not isinstance(value, bool):
            raise fail()
    elif kind == "str_or_list":
        if not (isinstance(value, str) or (isinstance(value, list)
                                           and all(isinstance(s, str) for s in value))):
            raise fail()
    elif kind == "structured":  # an object, or its JSON text (as the vLLM backend takes)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise fail() from None
        if not isinstance(value, dict):
            raise fail()
    elif kind == "int_list":
        if not (isinstance(value, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in value)):
            raise fail()
    return value


def _outputs(requested: list[str] | None, flagged: set[str]) -> list[str]:
    if requested is None:
        return ["text_output", *(o for o in _OUTPUT_NAMES if o in flagged)]
    for name in requested:
        if name not in _OUTPUT_NAMES:
            raise V2Error.bad(f"unknown output '{name:.100}' (this model has: "
                              f"{', '.join(_OUTPUT_NAMES)})")
    return list(dict.fromkeys(requested))


def _timeout(value) -> float | None:
    """Triton's request `timeout` parameter, in microseconds."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise V2Error.bad(f"parameter 'timeout' must be microseconds (an integer), "
                          f"got {value!r:.40}")
    return value / 1e6 if value else None


class ResponseBuilder:
    """Engine outputs -> response tensors for one job. Streamed responses carry what is new
    since the last one (text, token counts, logprobs); a single response carries it all."""

    def __init__(self, job: InferJob, decode) -> None:
        self.job, self.decode = job, decode
        self.sent_chars: dict[tuple[int, int], int] = {}
        self.sent_tokens: dict[tuple[int, int], int] = {}

    def tensors(self, outs: list) -> list[Tensor]:
        """``outs``: the newest RequestOutput of each prompt (all finished unless streaming)."""
        choices = [(p, c, out) for p, out in enumerate(outs)
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        shape = [len(choices)]
        values: dict[str, list] = {name: [] for name in self.job.outputs}
        for p, c, out in choices:
            key = (p, c.index)
            chars, toks = self.sent_chars.get(key, 0), self.sent_tokens.get(key, 0)
            text = c.text[chars:]
            if self.job.prepend_input and not self.job.stream:
                text = (out.prompt or "") + text
            row = {
                "text_output": lambda: text.encode("utf-8"),
                "finish_reason": lambda: str(c.finish_reason).encode("utf-8"),
                "cumulative_logprob": lambda: sum(
                    e[t].logprob for t, e in zip(c.token_ids, c.logprobs or ())),
                "logprobs": lambda: self._logprobs(c, toks),
                "num_input_tokens": lambda: len(out.prompt_token_ids),
                "num_output_tokens": lambda: len(c.token_ids) - toks,
            }
            for name in self.job.outputs:
                values[name].append(row[name]())
            if self.job.stream:
                self.sent_chars[key], self.sent_tokens[key] = len(c.text), len(c.token_ids)
        dtypes = {name: dtype for name, dtype, _ in OUTPUTS}
        return [Tensor(name, dtypes[name], list(shape), values[name]) for name in self.job.outputs]

    def _logprobs(self, c, start: int) -> bytes:
        if not self.job.user_logprobs or c.logprobs is None:
            return b"null"
        rows = [{str(t): {"logprob": lp.logprob, "rank": lp.rank,
                          "decoded_token": lp.decoded_token if lp.decoded_token is not None
                          else self.decode(t)} for t, lp in entry.items()}
                for entry in c.logprobs[start:]]
        return json.dumps(rows).encode("utf-8")


def model_metadata(name: str, versions: list[str]) -> dict:
    return {"name": name, "versions": versions, "platform": "kvserve",
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s, _ in INPUTS],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in OUTPUTS]}


def model_config(name: str, max_model_len: int) -> dict:
    """Triton's model configuration (as JSON; gRPC parses it into ModelConfig): enough for
    tools that read it (perf_analyzer, genai-perf) to see a decoupled, unbatched model."""
    type_of = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "UINT32": "TYPE_UINT32",
               "FP32": "TYPE_FP32"}
    return {
        "name": name, "platform": "kvserve", "backend": "kvserve", "max_batch_size": 0,
        "input": [{"name": n, "data_type": type_of[d], "dims": s, "optional": o}
                  for n, d, s, o in INPUTS],
        "output": [{"name": n, "data_type": type_of[d], "dims": s} for n, d, s in OUTPUTS],
        "model_transaction_policy": {"decoupled": True},
        "parameters": {"max_model_len": {"string_value": str(max_model_len)}},
    }
