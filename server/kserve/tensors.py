"""Tensors of the Open Inference Protocol (KServe v2), in and out of its three wire forms:
JSON ``data``, the binary tensor extension (raw bytes after a JSON header) and gRPC
(``raw_input_contents`` or typed ``InferTensorContents``). Every front end decodes to and
encodes from the same ``Tensor``, so the LLM contract never sees a wire format.

Values are kept flat (row-major) as Python lists: ``bytes`` for BYTES, ``bool``, ``int``,
``float``. A bad tensor raises ``V2Error`` (400 / INVALID_ARGUMENT) naming the tensor."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import V2Error

# Fixed-width datatypes and their little-endian numpy dtypes (BF16 has none: refused).
_NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPES = frozenset(_NUMPY) | {"BYTES"}
# gRPC InferTensorContents field that carries each datatype when raw contents are not used.
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents",
                   "UINT64": "uint64_contents", "FP32": "fp32_contents",
                   "FP64": "fp64_contents", "BYTES": "bytes_contents"}
MAX_ELEMENTS = 1 << 20  # per tensor: far more than an LLM request needs, bounds the work


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list
    parameters: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def check_header(name, datatype, shape) -> tuple[str, str, list[int]]:
    """The (name, datatype, shape) of an input, checked; returns them cleaned."""
    if not isinstance(name, str) or not name:
        raise V2Error.bad("every input needs a non-empty string 'name'")
    if datatype not in DATATYPES:
        raise V2Error.bad(f"input '{name:.100}': unsupported datatype {datatype!r:.40} "
                          f"(supported: {', '.join(sorted(DATATYPES))})")
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise V2Error.bad(f"input '{name}': 'shape' must be a list of non-negative integers")
    shape = list(shape)
    if len(shape) > 8 or math.prod(shape) > MAX_ELEMENTS:
        raise V2Error.bad(f"input '{name}': shape {shape} is too large "
                          f"(at most {MAX_ELEMENTS} elements)")
    return name, datatype, shape


# ---- raw bytes (binary extension and gRPC raw contents) ----------------------------------
def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> list:
    n = math.prod(shape)
    if datatype == "BYTES":
        return _split_bytes(name, raw, n)
    itemsize = np.dtype(_NUMPY[datatype]).itemsize
    if len(raw) != n * itemsize:
        raise V2Error.bad(f"input '{name}': {len(raw)} bytes of {datatype} data do not fill "
                          f"shape {shape} ({n * itemsize} bytes)")
    return np.frombuffer(raw, dtype=_NUMPY[datatype]).tolist()


def _split_bytes(name: str, raw: bytes, n: int) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise V2Error.bad(f"input '{name}': BYTES data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise V2Error.bad(f"input '{name}': a BYTES element claims {length} bytes but only "
                              f"{len(raw) - pos} remain")
        out.append(bytes(raw[pos:pos + length]))
        pos += length
    if len(out) != n:
        raise V2Error.bad(f"input '{name}': {len(out)} BYTES elements for a shape of {n}")
    return out


def to_raw(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data)
    return np.asarray(t.data, dtype=_NUMPY[t.datatype]).tobytes()


# ---- JSON (HTTP, with or without the binary extension) -----------------------------------
def parse_http_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """Split an infer body into its JSON header (parsed) and the binary data after it."""
    from .. import protocol as P

    if header_length is None:
        return _v2_json(P, body), b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise V2Error.bad(f"Inference-Header-Content-Length {header_length!r:.40} does not fit "
                          f"a body of {len(body)} bytes")
    n = int(header_length)
    return _v2_json(P, body[:n]), body[n:]


def _v2_json(P, data: bytes) -> dict:
    try:
        return P.parse_json(data)
    except P.APIError as e:
        raise V2Error.bad(e.message) from e


def inputs_from_json(request: dict, binary: bytes) -> list[Tensor]:
    """The request's ``inputs``: each with JSON ``data`` or, with the binary extension, a
    ``binary_data_size`` parameter taking that many bytes from ``binary`` in input order."""
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2Error.bad("'inputs' must be a non-empty list")
    tensors, offset = [], 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise V2Error.bad("each entry of 'inputs' must be an object")
        name, datatype, shape = check_header(item.get("name"), item.get("datatype"),
                                             item.get("shape"))
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise V2Error.bad(f"input '{name}': 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                    or offset + size > len(binary):
                raise V2Error.bad(f"input '{name}': binary_data_size {size!r:.40} runs past "
                                  f"the {len(binary)} bytes of binary data")
            data = from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        else:
            if "data" not in item:
                raise V2Error.bad(f"input '{name}' has neither 'data' nor binary_data_size")
            data = _json_values(name, datatype, shape, item["data"])
        tensors.append(Tensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise V2Error.bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _json_values(name: str, datatype: str, shape: list[int], data) -> list:
    flat = _flatten(data)
    n = math.prod(shape)
    if len(flat) != n:
        raise V2Error.bad(f"input '{name}': {len(flat)} values for shape {shape} ({n} needed)")
    check = {"BYTES": lambda v: isinstance(v, str),
             "BOOL": lambda v: isinstance(v, bool)}.get(
        datatype, (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if datatype.startswith("FP") else
        (lambda v: isinstance(v, int) and not isinstance(v, bool)))
    for v in flat:
        if not check(v):
            raise V2Error.bad(f"input '{name}': {v!r:.60} is not a {datatype} value")
    if datatype == "BYTES":
        return [v.encode("utf-8") for v in flat]
    if datatype in _NUMPY and datatype != "BOOL" and not datatype.startswith("FP"):
        info = np.iinfo(_NUMPY[datatype])
        if any(not info.min <= v <= info.max for v in flat):
            raise V2Error.bad(f"input '{name}': a value is out of range for {datatype}")
    return flat


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:  # iterative: nesting depth is the client's to choose
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def output_json(t: Tensor, binary: bool) -> tuple[dict, bytes | None]:
    """One output's JSON entry, and its raw bytes when it goes out as binary data."""
    entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
    if binary:
        raw = to_raw(t)
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    if t.datatype == "BYTES":
        entry["data"] = [b.decode("utf-8", errors="replace") for b in t.data]
    else:
        entry["data"] = t.data
    return entry, None


# ---- gRPC ------------------------------------------------------------------------------
def inputs_from_grpc(request) -> list[Tensor]:
    """A ModelInferRequest's inputs: from ``raw_input_contents`` (one per input, in order)
    when present, else from each input's typed ``contents``."""
    if not request.inputs:
        raise V2Error.bad("the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise V2Error.bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for i, item in enumerate(request.inputs):
        name, datatype, shape = check_header(item.name, item.datatype, list(item.shape))
        if raw:
            data = from_raw(name, datatype, shape, raw[i])
        else:
            data = list(getattr(item.contents, _CONTENTS_FIELD[datatype]))
            if len(data) != math.prod(shape):
                raise V2Error.bad(f"input '{name}': {len(data)} values for shape {shape}")
        params = {k: _param_value(v) for k, v in item.parameters.items()}
        tensors.append(Tensor(name, datatype, shape, data, params))
    return tensors


def grpc_params(parameters) -> dict:
    """A protobuf map<string, InferParameter> as plain Python values."""
    return {k: _param_value(v) for k, v in parameters.items()}


def _param_value(p):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def set_grpc_param(parameters, key: str, value) -> None:
    slot = parameters[key]
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        slot.int64_param = value
    elif isinstance(value, float):
        slot.double_param = value
    else:
        slot.string_param = str(value)
