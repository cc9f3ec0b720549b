"""The whole engine on the Triton backend: greedy tokens equal to the torch backend's.

On CPU the kernels run in the Triton interpreter: TRITON_INTERPRET=1 is set here before
anything imports kernels.paged_attention (the kernels are defined at import time; the
TritonAttentionBackend imports them lazily, when the first engine is built). On CUDA they
run natively and the CUDA-only tests below (bf16 / fp32 parity, CUDA graphs, the real
model against transformers) run too; on CPU those skip.
"""
from __future__ import annotations

import contextlib
import random

import pytest
import torch

from triton_env import ON_CUDA  # first: the interpreter on CPU

from conftest import TINY_VOCAB, assert_no_leak, hf_greedy  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.core.config import EngineConfig  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
NEW_TOKENS = 6


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
    kw.setdefault("dtype", "float32")
    return LLM(tiny_models(arch)[0], skip_tokenizer_init=True, attention_backend=backend, **kw)


def run_both(tiny_models, arch, batches, max_tokens=NEW_TOKENS, **kw):
    """backend -> (greedy tokens of each batch run in turn, prefix-cache hits)."""
    results = {}
    for backend in ("torch", "triton"):
        llm = tiny_llm(tiny_models, arch, backend, dtype="float32", **kw)
        out = [greedy(llm, batch, max_tokens) for batch in batches]
        results[backend] = (out, llm.engine.kv_cache.pool.num_cache_hits)
        assert_no_leak(llm.engine)
    return results


def test_triton_matches_torch_chunked_prefill_and_prefix_hits(tiny_models):
    """Llama (GQA 2, head_dim 16): mixed prompt lengths, one past block_size, chunked
    prefill (16-token budget: chunks on cached context next to decodes), and a second
    batch whose prompt shares 20 tokens (one full block) with the first batch's."""
    system = prompts([20], seed=1)[0]
    batches = [prompts([3], seed=2, prefix=system),
               prompts([1, 37, 5], seed=3) + prompts([9], seed=4, prefix=system)]
    res = run_both(tiny_models, "llama", batches, max_num_batched_tokens=16)
    assert res["triton"][0] == res["torch"][0]
    assert res["triton"][1] == res["torch"][1] > 0  # the prefix was really shared


def test_triton_matches_torch_sliding_window(tiny_models):
    """Mistral (sliding window 48, 8 KV heads, head_dim 8 padded to 16): a 52-token prompt
    prefilled in chunks of 32 then decoded, so the window cuts keys in both."""
    res = run_both(tiny_models, "mistral", [prompts([52, 3], seed=5)], max_num_batched_tokens=32)
    assert res["triton"][0] == res["torch"][0]


class _Replayer:
    """Stands in for a captured decode CUDA graph on CPU: replay() reruns the model on the
    runner's static buffers and writes the graph's output tensor in place, as a replay would."""

    def __init__(self, runner, bs, out, log):
        self.runner, self.bs, self.out, self.log = runner, bs, out, log

    def replay(self):
        r, bs = self.runner, self.bs
        n = int((r._g_lens[:bs] > 0).sum())  # real decodes have seq_len >= 1
        assert (r._g_lens[n:bs] == 0).all() and (r._g_slots[n:bs] == -1).all(), \
            "padding rows must store nothing and attend to nothing"
        assert (r._g_slots[:n] >= 0).all()
        self.log.append((bs, n))
        self.out.copy_(r.model(*r._graph_args(bs)))


class _MixedReplayer(_Replayer):
    """The same for a mixed-step graph of self.bs padded tokens over every sequence slot."""

    def replay(self):
        r, tokens = self.runner, self.bs
        qsl, lens = r._m_qsl.tolist(), r._g_lens.tolist()
        b = sum(1 for x in lens if x > 0)
        n = qsl[b]
        assert 0 < n <= tokens and qsl[b:] == [n] * (len(qsl) - b), \
            "padding sequences must have no queries"
        assert all(x == 0 for x in lens[b:]), "padding sequences must have no keys"
        assert (r._g_slots[n:tokens] == -1).all() and (r._g_slots[:n] >= 0).all()
        self.log.append(("mixed", tokens, n))
        self.out.copy_(r.model(*r._mixed_graph_args(tokens)))


def test_graph_padding_logic_on_cpu(tiny_models, monkeypatch):
    """The CUDA-graph paths minus the graphs: static buffers, padding a decode batch up to a
    captured size (slot -1, seq_len 0), padding a step with prefill chunks up to a captured
    token count over every sequence slot, and picking the graph, checked token for token."""
    if ON_CUDA:
        pytest.skip("covered by the real graphs in test_cuda_graphs_match_eager")
    batch = prompts([3, 40, 17, 9], seed=5)
    max_tokens = [3, 9, 5, 7]  # the batch shrinks 4 -> 3 -> 2 -> 1 while decoding
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32)  # chunked prefill next to decodes
    ref = greedy(tiny_llm(tiny_models, "llama", "torch", **kw), batch, max_tokens)

    llm = tiny_llm(tiny_models, "llama", "triton", **kw)
    runner = llm.engine.runner
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    runner._capture_graphs()
    assert sorted(runner._graphs) == [1, 2, 4]
    assert sorted(runner._mixed_graphs) == [16, 32]
    log = []
    runner._graphs = {bs: (_Replayer(runner, bs, out, log), out)
                      for bs, (_, out) in runner._graphs.items()}
    runner._mixed_graphs = {t: (_MixedReplayer(runner, t, out, log), out)
                            for t, (_, out) in runner._mixed_graphs.items()}
    assert greedy(llm, batch, max_tokens) == ref
    # 3 decodes padded to 4, then exact sizes; mixed steps at the full budget and padded
    assert (4, 3) in log and (2, 2) in log and (1, 1) in log
    mixed = [e for e in log if e[0] == "mixed"]
    assert any(n < t for _, t, n in mixed) and any(n == 32 for _, _, n in mixed), mixed
    assert_no_leak(llm.engine)


def test_failed_graph_capture_raises(tiny_models, monkeypatch):
    """A capture that fails is an error naming the graph (the largest, captured first) and the
    way out, with the cause chained: not a warning and a silently 3-4x slower engine."""
    if ON_CUDA:
        pytest.skip("fakes the CUDA graph API on CPU")
    llm = tiny_llm(tiny_models, "llama", "triton", max_num_seqs=4)
    runner = llm.engine.runner

    def broken_graph(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", broken_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="mixed step of 512 tokens.*enforce_eager") as info:
        runner._capture_graphs()
    assert "stream is capturing" in str(info.value.__cause__)


LAUNCHES_PER_LAYER = 12  # issue 19's budget for one decode step on the Triton path


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_step_launches_per_layer(tiny_models, arch):
    """Kernel launches of one pure decode step, counted per decoder layer by instrumenting the
    launchers (kernels/launch_count.py: Triton runs and compute aten ops): norms, rotary and
    SiLU * up are one launch each; Qwen3's q/k norms go into the rotary launch."""
    from kernels.launch_count import count_launches

    llm = tiny_llm(tiny_models, arch, "triton", max_num_seqs=4, enforce_eager=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts([5, 9, 3], seed=8)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    engine.step()  # the prefill step
    layers = engine.runner.model.model.layers
    with count_launches() as counter, \
            counter.scoped({f"layer{i}": m for i, m in enumerate(layers)}):
        engine.step()  # three decodes
    per_scope = counter.per_scope()
    per_layer = [per_scope[f"layer{i}"] for i in range(len(layers))]
    assert len(set(per_layer)) == 1, per_layer  # every layer launches the same kernels
    ops = counter.ops("layer0")
    assert per_layer[0] <= LAUNCHES_PER_LAYER, ops
    # 3 decodes x 2 KV heads leave the interpreter's pretend device idle: split-KV (2 launches)
    for kernel in ("triton:_rms_norm_kernel", "triton:_rotary_qk_kernel",
                   "triton:_silu_mul_kernel", "triton:_store_kv_kernel",
                   "triton:_paged_decode_split_kernel", "triton:_merge_splits_kernel"):
        assert ops.get(kernel) == (2 if kernel == "triton:_rms_norm_kernel" else 1), ops
    # the counter sees aten compute ops too: the four projections' matmuls, and nothing else
    # (on CPU they are oneDNN's prepacked linear, on CUDA addmm / mm)
    assert sum(n for op, n in ops.items() if not op.startswith("triton:")) == 4, ops
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leak(engine)


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

    llm = LLM(dtype="float32", device="cuda", gpu_memory_utilization=0.6)
    assert llm.engine.config.backend_name == "triton" and llm.engine.runner._graphs
    # the pool was sized by profiling: everything torch holds now fits the 60% (+ slack)
    _, total = torch.cuda.mem_get_info()
    assert llm.engine.runner.num_blocks > 1000
    assert torch.cuda.memory_reserved() <= 0.62 * total
    chats = [llm.render_chat(c) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(chats, params, use_tqdm=False)
    for prompt, out in zip(chats, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_smol, prompt["prompt_token_ids"], 32)
    assert_no_leak(llm.engine)
