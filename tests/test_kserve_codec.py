"""KServe v2 tensors and the LLM tensor contract, without a model: every wire form decodes
to the same tensors, bad tensors are 400s naming the input, and responses mean what the
vLLM backend's do (prompt prepended unless excluded, streamed deltas, token counts)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_byte_tensor

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from server.kserve import contract, tensors
from server.kserve.errors import V2Error
from server.kserve.tensors import Tensor


def bad(fn, *args, match: str):
    with pytest.raises(V2Error) as e:
        fn(*args)
    assert e.value.http_status == 400 and e.value.grpc_code == "INVALID_ARGUMENT"
    assert match in e.value.message, e.value.message


# ---- the three wire forms ------------------------------------------------------------
def test_json_binary_and_grpc_decode_to_the_same_tensors():
    prompts = ["héllo", "", "a\x00b"]
    raw = serialize_byte_tensor(np.array([p.encode() for p in prompts], dtype=np.object_)).item()
    as_json = tensors.inputs_from_json(
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [3], "data": prompts},
                    {"name": "stream", "datatype": "BOOL", "shape": [1], "data": [[False]]}]}, b"")
    as_binary = tensors.inputs_from_json(
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [3],
                     "parameters": {"binary_data_size": len(raw)}},
                    {"name": "stream", "datatype": "BOOL", "shape": [1],
                     "parameters": {"binary_data_size": 1}}]}, raw + b"\x00")
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[3])
    req.inputs.add(name="stream", datatype="BOOL", shape=[1])
    req.raw_input_contents.extend([raw, b"\x00"])
    as_raw = tensors.inputs_from_grpc(req)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        [p.encode() for p in prompts])
    req.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(False)
    as_contents = tensors.inputs_from_grpc(req)
    for got in (as_binary, as_raw, as_contents):
        assert [(t.name, t.datatype, t.shape, t.data) for t in got] == \
               [(t.name, t.datatype, t.shape, t.data) for t in as_json]
    assert as_json[0].data == [p.encode() for p in prompts]


@pytest.mark.parametrize("datatype,values", [
    ("UINT32", [0, 7, 2**32 - 1]), ("FP32", [0.5, -1.25, 3.0]), ("INT64", [-2**63, 0, 5]),
    ("BOOL", [True, False, True]), ("BYTES", [b"", b"x" * 300, "ü".encode()])])
def test_raw_round_trip(datatype, values):
    t = Tensor("x", datatype, [3], values)
    assert tensors.from_raw("x", datatype, [3], tensors.to_raw(t)) == values
    entry, raw = tensors.output_json(t, binary=True)
    assert entry["parameters"]["binary_data_size"] == len(raw)


def test_bytes_tensor_layout_is_length_prefixed_little_endian():
    t = Tensor("text_output", "BYTES", [2], [b"ab", b""])
    assert tensors.to_raw(t) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


def test_malformed_tensors_are_400s_naming_the_input():
    hdr = {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    bad(tensors.from_raw, "text_input", "BYTES", [1], b"\x05\x00", match="inside a length prefix")
    bad(tensors.from_raw, "text_input", "BYTES", [1], struct.pack("<I", 99) + b"ab",
        match="claims 99 bytes")
    bad(tensors.from_raw, "text_input", "BYTES", [2], struct.pack("<I", 1) + b"a",
        match="1 BYTES elements for a shape of 2")
    bad(tensors.from_raw, "n", "UINT32", [2], b"\x00" * 7, match="do not fill")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "data": ["a", "b"]}]}, b"",
        match="2 values for shape [1]")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "data": [1]}]}, b"", match="not a BYTES")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "datatype": "STRING", "data": ["a"]}]}, b"",
        match="unsupported datatype")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "shape": [-1], "data": ["a"]}]}, b"",
        match="non-negative")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "shape": [1 << 30], "data": []}]}, b"",
        match="too large")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "parameters": {"binary_data_size": 9}}]},
        b"abc", match="runs past")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr, "data": ["a"]}]}, b"extra",
        match="belong to no input")
    bad(tensors.inputs_from_json, {"inputs": []}, b"", match="non-empty list")
    bad(tensors.inputs_from_json, {"inputs": [{**hdr}]}, b"", match="neither 'data'")
    bad(tensors.inputs_from_json, {"inputs": [{"name": "x", "datatype": "UINT32", "shape": [1],
                                               "data": [-1]}]}, b"", match="out of range")
    bad(tensors.parse_http_body, b'{"inputs": []}', "99", match="does not fit")
    bad(tensors.parse_http_body, b"{nope", None, match="not valid JSON")
    bad(tensors.parse_http_body, b'{"a": NaN}', None, match="not valid JSON")
    req = pb.ModelInferRequest()
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.extend([b"", b""])
    bad(tensors.inputs_from_grpc, req, match="2 raw_input_contents for 1 inputs")


def test_deeply_nested_json_data_is_flattened_without_recursion():
    data = ["a"]
    for _ in range(5000):
        data = [data]
    t = tensors.inputs_from_json({"inputs": [{"name": "text_input", "datatype": "BYTES",
                                              "shape": [1], "data": data}]}, b"")[0]
    assert t.data == [b"a"]


# ---- the contract: inputs ------------------------------------------------------------
def text(*prompts: str) -> Tensor:
    return Tensor("text_input", "BYTES", [len(prompts)], [p.encode() for p in prompts])


def flag(name: str, value: bool) -> Tensor:
    return Tensor(name, "BOOL", [1], [value])


def sampling(obj) -> Tensor:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return Tensor("sampling_parameters", "BYTES", [1], [raw])


def test_sampling_parameters_accept_strings_as_the_vllm_backend_does():
    job = contract.parse_job([text("hi"), sampling(
        {"temperature": "0.5", "max_tokens": "7", "top_k": 3.0, "ignore_eos": "true",
         "stop": ["\n"], "seed": None})], {}, None, stream_rpc=False)
    p = job.params
    assert (p.temperature, p.max_tokens, p.top_k, p.ignore_eos, p.stop) == (0.5, 7, 3, True, ["\n"])
    assert contract.parse_job([text("hi")], {}, None, False).params.max_tokens == 16


def test_request_parameters_sample_too_and_the_tensor_wins():
    job = contract.parse_job([text("hi"), sampling({"max_tokens": 5})],
                             {"temperature": 0, "max_tokens": 9, "priority": 1, "timeout": 2_000_000,
                              "triton_enable_empty_final_response": True}, None, False)
    assert (job.params.temperature, job.params.max_tokens, job.timeout) == (0, 5, 2.0)


def test_contract_errors_name_the_problem():
    parse = contract.parse_job
    bad(parse, [flag("stream", False)], {}, None, False, match="'text_input' is required")
    bad(parse, [text()], {}, None, False, match="holds no prompt")
    bad(parse, [Tensor("text_input", "INT32", [1], [1])], {}, None, False,
        match="must be BYTES, got INT32")
    bad(parse, [text("a"), Tensor("stream", "INT32", [1], [1])], {}, None, True,
        match="'stream' must be BOOL")
    bad(parse, [text("a"), Tensor("stream", "BOOL", [2], [True, True])], {}, None, True,
        match="must hold one value")
    bad(parse, [text("a"), sampling(b"{oops")], {}, None, False,
        match="'sampling_parameters' is not valid JSON")
    bad(parse, [text("a"), sampling([1])], {}, None, False, match="must be a JSON object")
    bad(parse, [text("a"), sampling({"temprature": 1})], {}, None, False,
        match="unknown sampling parameter(s) temprature")
    bad(parse, [text("a"), sampling({"temperature": "hot"})], {}, None, False,
        match="'temperature' must be number")
    bad(parse, [text("a"), sampling({"top_k": 2**70})], {}, None, False, match="top_k")
    bad(parse, [text("a"), sampling({"temperature": "nan"})], {}, None, False,
        match="temperature")
    bad(parse, [text("a"), Tensor("image", "BYTES", [1], [b""])], {}, None, False,
        match="unexpected input 'image'")
    bad(parse, [text("a"), text("b")], {}, None, False, match="given twice")
    bad(parse, [Tensor("text_input", "BYTES", [1], [b"\xff"])], {}, None, False,
        match="not valid UTF-8")
    bad(parse, [text("a"), flag("stream", True)], {}, None, False, match="needs a streaming call")
    bad(parse, [text("a"), flag("stream", True), flag("exclude_input_in_output", False)], {},
        None, True, match="exclude_input_in_output")
    bad(parse, [text("a")], {}, ["text_output", "nope"], False, match="unknown output 'nope'")
    bad(parse, [text("a")], {"timeout": -1}, None, False, match="microseconds")


# ---- the contract: outputs -----------------------------------------------------------
def out(prompt, pids, choices, finished):
    return RequestOutput("r", prompt, pids, [CompletionOutput(i, t, ids, fr, logprobs=lp)
                                             for i, (t, ids, fr, lp) in enumerate(choices)],
                         finished)


def by_name(ts):
    return {t.name: (t.shape, t.data) for t in ts}


ALL_FLAGS = [flag(f"return_{n}", True) for n in
             ("finish_reason", "num_input_tokens", "num_output_tokens", "cumulative_logprob")]


def test_unary_response_prepends_the_prompt_unless_excluded():
    final = out("Hi", [1, 2], [(" there", [5, 6], "length", None)], True)
    job = contract.parse_job([text("Hi"), *ALL_FLAGS], {}, None, False)
    got = by_name(contract.ResponseBuilder(job, str).tensors([final]))
    assert got["text_output"] == ([1], [b"Hi there"])
    assert got["finish_reason"] == ([1], [b"length"])
    assert got["num_input_tokens"] == ([1], [2]) and got["num_output_tokens"] == ([1], [2])
    job = contract.parse_job([text("Hi"), flag("exclude_input_in_output", True)], {}, None, False)
    assert by_name(contract.ResponseBuilder(job, str).tensors([final])) == {
        "text_output": ([1], [b" there"])}


def test_streamed_responses_carry_deltas_and_none_until_finished():
    lp = [{5: Logprob(-0.5, 1)}, {6: Logprob(-0.25, 1, "!")}]
    job = contract.parse_job([text("Hi"), flag("stream", True), flag("return_logprobs", True),
                              sampling({"logprobs": 0}), *ALL_FLAGS], {}, None, True)
    b = contract.ResponseBuilder(job, lambda t: f"<{t}>")
    first = by_name(b.tensors([out("Hi", [1, 2], [(" a", [5], None, lp[:1])], False)]))
    second = by_name(b.tensors([out("Hi", [1, 2], [(" a!", [5, 6], "stop", lp)], True)]))
    assert first["text_output"][1] == [b" a"] and second["text_output"][1] == [b"!"]
    assert first["finish_reason"][1] == [b"None"] and second["finish_reason"][1] == [b"stop"]
    assert first["num_output_tokens"][1] == [1] and second["num_output_tokens"][1] == [1]
    assert second["num_input_tokens"][1] == [2]
    assert json.loads(first["logprobs"][1][0]) == [
        {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "<5>"}}]
    assert json.loads(second["logprobs"][1][0]) == [
        {"6": {"logprob": -0.25, "rank": 1, "decoded_token": "!"}}]
    assert second["cumulative_logprob"][1] == [-0.75]


def test_batch_and_n_flatten_prompt_major_and_outputs_can_be_named():
    job = contract.parse_job([text("a", "b"), sampling({"n": 2}), flag("exclude_input_in_output",
                                                                        True)],
                             {}, ["num_output_tokens", "text_output"], False)
    assert job.params.n == 2
    outs = [out("a", [1], [("x", [1], "stop", None), ("yy", [1, 2], "length", None)], True),
            out("b", [2], [("z", [3], "stop", None), ("w", [4], "stop", None)], True)]
    ts = contract.ResponseBuilder(job, str).tensors(outs)
    assert [t.name for t in ts] == ["num_output_tokens", "text_output"]
    assert by_name(ts) == {"num_output_tokens": ([4], [1, 2, 1, 1]),
                           "text_output": ([4], [b"x", b"yy", b"z", b"w"])}


def test_logprobs_are_null_unless_sampling_asks_for_them():
    job = contract.parse_job([text("a"), flag("return_logprobs", True),
                              flag("return_cumulative_logprob", True)], {}, None, False)
    assert job.params.logprobs == 0 and not job.user_logprobs  # kept for the sum only
    final = out("a", [1], [("x", [7], "stop", [{7: Logprob(-1.5, 1)}])], True)
    got = by_name(contract.ResponseBuilder(job, str).tensors([final]))
    assert got["logprobs"] == ([1], [b"null"]) and got["cumulative_logprob"] == ([1], [-1.5])


def test_engine_failures_map_to_protocol_errors():
    from engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
    from server import protocol as P
    from server.kserve.service import engine_errors

    cases = [(QueueFullError("9 waiting"), 503, "UNAVAILABLE"),
             (EngineDeadError("loop died"), 503, "UNAVAILABLE"),
             (RequestFailedError("boom"), 500, "INTERNAL"),
             (ValueError("bad prompt"), 400, "INVALID_ARGUMENT"),
             (P.APIError(401, "key"), 401, "UNAUTHENTICATED"),
             (P.APIError(404, "model"), 404, "NOT_FOUND"),
             (P.APIError(413, "big"), 413, "INVALID_ARGUMENT"),
             (P.APIError(504, "late"), 504, "DEADLINE_EXCEEDED"),
             (P.APIError(408, "slow body"), 408, "INVALID_ARGUMENT")]
    for exc, status, code in cases:
        with pytest.raises(V2Error) as e, engine_errors():
            raise exc
        assert (e.value.http_status, e.value.grpc_code) == (status, code), exc


def test_sampling_parameters_carry_structured_outputs_as_the_vllm_backend_does():
    job = contract.parse_job([text("a"), sampling(
        {"structured_outputs": json.dumps({"choice": ["x", "y"]})})], {}, None, False)
    assert job.params.structured_outputs.choice == ("x", "y")
    job = contract.parse_job([text("a"), sampling(
        {"guided_decoding": {"regex": "[0-9]+", "backend": "xgrammar"}})], {}, None, False)
    assert job.params.structured_outputs.regex == "[0-9]+"
    job = contract.parse_job([text("a"), sampling(
        {"response_format": {"type": "json_object"}})], {}, None, False)
    assert job.params.structured_outputs.json_object
    bad(contract.parse_job, [text("a"), sampling({"structured_outputs": {"regex": "a",
                                                                         "choice": ["b"]}})],
        {}, None, False, match="exactly one")
    bad(contract.parse_job, [text("a"), sampling({"structured_outputs": "{not json"})], {}, None,
        False, match="'structured_outputs' must be an object")


def test_sampling_parameters_logit_bias():
    job = contract.parse_job([text("a"), sampling({"logit_bias": {"5": -100, "7": 2.5}})],
                             {}, None, False)
    assert job.params.logit_bias == {5: -100.0, 7: 2.5}
    bad(contract.parse_job, [text("a"), sampling({"logit_bias": {"five": 1}})], {}, None, False,
        match="logit_bias keys must be token ids")
    bad(contract.parse_job, [text("a"), sampling({"logit_bias": {"5": 500}})], {}, None, False,
        match="logit_bias values must be in [-100, 100]")
