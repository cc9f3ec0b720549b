"""The whole engine on the Triton backend: greedy tokens equal to the torch backend's.

On CPU the kernels run in the Triton interpreter: TRITON_INTERPRET=1 is set here before
anything imports kernels.paged_attention (the kernels are defined at import time; the
TritonAttentionBackend imports them lazily, when the first engine is built). On CUDA they
run natively and the CUDA-only tests below (bf16 / fp32 parity, CUDA graphs, the real
model against transformers) run too; on CPU those skip.
"""
from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import TINY_VOCAB, assert_no_leak, hf_greedy  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
NEW_TOKENS = 8


def prompts(lens, seed, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(TINY_VOCAB) for _ in range(n)] for n in lens]


def greedy(llm, batch, max_tokens=NEW_TOKENS):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in ([max_tokens] * len(batch) if isinstance(max_tokens, int) else max_tokens)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def tiny_llm(tiny_models, arch, backend, **kw):
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("device", DEVICE)
    return LLM(tiny_models(arch)[0], skip_tokenizer_init=True, attention_backend=backend, **kw)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # GQA 2 / head_dim 16; sliding window 48
def test_triton_backend_matches_torch_backend(tiny_models, arch):
    """Mixed prompt lengths (one past block_size), a shared prefix hitting the prefix cache,
    and chunked prefill (16-token budget: chunks on cached context, decodes alongside)."""
    system = prompts([20], seed=1)[0]
    first = prompts([3], seed=2, prefix=system)
    rest = prompts([1, 37, 5], seed=3) + prompts([9], seed=4, prefix=system)
    results = {}
    for backend in ("torch", "triton"):
        llm = tiny_llm(tiny_models, arch, backend, max_num_batched_tokens=16,
                       dtype="float32")
        out = greedy(llm, first) + greedy(llm, rest)
        results[backend] = (out, llm.engine.kv_cache.pool.num_cache_hits)
        assert_no_leak(llm.engine)
    assert results["triton"][0] == results["torch"][0]
    assert results["triton"][1] == results["torch"][1] > 0  # the prefix was really shared


class _Replayer:
    """Stands in for a captured CUDA graph on CPU: replay() reruns the model on the runner's
    static buffers and writes the graph's output tensor in place, as a replay would."""

    def __init__(self, runner, bs, out, log):
        self.runner, self.bs, self.out, self.log = runner, bs, out, log

    def replay(self):
        self.log.append((self.bs, int((self.runner._g_lens[:self.bs] > 0).sum())))
        self.out.copy_(self.runner.model(*self.runner._graph_args(self.bs)))


def test_decode_graph_padding_logic_on_cpu(tiny_models, monkeypatch):
    """The CUDA-graph path minus the graphs: static buffers, padding a decode batch up to a
    captured size (slot -1, seq_len 0), and picking the graph, checked token for token."""
    if ON_CUDA:
        pytest.skip("covered by the real graphs in test_cuda_graphs_match_eager")
    batch = prompts([3, 40, 17], seed=5)
    max_tokens = [4, 9, 6]  # the batch shrinks 3 -> 2 -> 1 while decoding
    ref = greedy(tiny_llm(tiny_models, "llama", "torch", max_num_seqs=4), batch, max_tokens)

    llm = tiny_llm(tiny_models, "llama", "triton", max_num_seqs=4)
    runner = llm.engine.runner
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    runner._capture_decode_graphs()
    assert sorted(runner._graphs) == [1, 2, 4]
    log = []
    runner._graphs = {bs: (_Replayer(runner, bs, out, log), out)
                      for bs, (_, out) in runner._graphs.items()}
    assert greedy(llm, batch, max_tokens) == ref
    assert (4, 3) in log and (2, 2) in log and (1, 1) in log  # padded 3 -> 4, then exact
    assert_no_leak(llm.engine)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        EngineConfig(device="cpu", attention_backend="triton")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(device="cpu", attention_backend="flash")
    EngineConfig(device="cpu", attention_backend="torch")  # fine


# ---- CUDA only ---------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_cuda_triton_matches_torch_backend(tiny_models, arch, dtype):
    batch = prompts([1, 7, 16, 17, 33, 121], seed=6)
    kw = dict(dtype=dtype, max_num_batched_tokens=64, num_kv_blocks=128)
    torch_out = greedy(tiny_llm(tiny_models, arch, "torch", **kw), batch, 20)
    llm = tiny_llm(tiny_models, arch, "triton", **kw)
    assert llm.engine.runner._graphs, "decode CUDA graphs were not captured"
    triton_out = greedy(llm, batch, 20)
    if dtype == "float32":
        assert triton_out == torch_out
    else:
        # bf16: two correct attention kernels round differently; a near-tie can flip a
        # greedy pick and everything after it. Demand the start of every sequence and most
        # sequences in full.
        assert all(a[:4] == b[:4] for a, b in zip(triton_out, torch_out))
        same = sum(a == b for a, b in zip(triton_out, torch_out))
        assert same >= len(batch) - 1, f"{same}/{len(batch)} sequences equal"


@cuda_only
def test_cuda_graphs_match_eager(tiny_models):
    batch = prompts([5, 40, 17, 2, 64], seed=7)
    max_tokens = [6, 12, 9, 3, 10]
    eager = greedy(tiny_llm(tiny_models, "llama", "triton", enforce_eager=True, max_num_seqs=8),
                   batch, max_tokens)
    llm = tiny_llm(tiny_models, "llama", "triton", max_num_seqs=8)
    assert sorted(llm.engine.runner._graphs) == [1, 2, 4, 8]
    assert greedy(llm, batch, max_tokens) == eager
    assert_no_leak(llm.engine)


@cuda_only
def test_cuda_real_model_matches_transformers(hf_smol):
    """The default model (SmolLM2-135M) on CUDA in fp32 with the Triton backend and CUDA
    graphs against transformers' greedy on CPU."""
    from test_smollm2 import CHATS

    llm = LLM(dtype="float32", device="cuda")
    assert llm.engine.config.backend_name == "triton" and llm.engine.runner._graphs
    chats = [llm.render_chat(c) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(chats, params, use_tqdm=False)
    for prompt, out in zip(chats, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_smol, prompt["prompt_token_ids"], 32)
    assert_no_leak(llm.engine)
