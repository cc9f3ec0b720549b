"""Multi-LoRA: PEFT adapters built here on a tiny random Llama, PEFT's merged models as the
oracle; slot bookkeeping step by step; adapters mixed in batches under chunked prefill,
preemption and slot pressure; prefix-cache isolation; every bad adapter refused by name."""
from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch

from conftest import TINY_VOCAB, assert_no_leak, hf_greedy
from engine import LLM, LoRARequest, SamplingParams
from engine.core.lora import LoRASlots

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW = 24


def save_adapter(base_model, path: str, seed: int, **config):
    """A PEFT adapter with random (non-zero) A and B, saved to ``path``; returns PEFT's
    merged model, the oracle. (PEFT's default init makes B zero: a no-op adapter.)"""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base_model),
                           LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(path)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """name -> (LoRARequest, merged oracle model); the base under None."""
    base_dir, base = tiny_models("llama")
    root = tmp_path_factory.mktemp("loras")
    specs = {
        "A": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL),
        "B": dict(r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"q_proj": 4, "down_proj": 2},
                  alpha_pattern={"v_proj": 4}),
        "C": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    out = {None: (None, base)}
    for i, (name, spec) in enumerate(specs.items(), start=1):
        path = str(root / name)
        out[name] = (LoRARequest(name, i, path), save_adapter(base, path, seed=i, **spec))
    return out


def lora_llm(tiny_models, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("max_lora_rank", 8)
    return LLM(tiny_models("llama")[0], skip_tokenizer_init=True, dtype="float32",
               enable_lora=True, **kw)


def prompts(lens, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in lens]


def greedy(llm, prompt_list, loras, max_tokens=NEW):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params,
                        use_tqdm=False, lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


# ---- the C++ op (CPU path) against the torch reference ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [
    [(5, 1)],                                   # one run
    [(40, 0), (3, -1), (45, 2)],                # few long runs (prefill chunks)
    [(1, 0), (1, 2), (1, -1), (2, 1), (1, 0), (2, 2), (1, -1), (1, 0)],  # decode rows
    [(3, 0), (4, 0), (0, 1), (2, -1), (6, 0)],  # requests merging into runs, an empty one
])
@pytest.mark.parametrize("width", [12, 40])     # tails shorter than one vector; 2.5 vectors
def test_bgmv_deltas_equal_the_reference(dtype, pieces, width):
    from kernels import cpu_ops
    from kernels.lora import lora_delta_bgmv, lora_delta_torch, slot_mask, slot_runs, token_slots

    if not cpu_ops.available():
        pytest.skip("no C++ toolchain")
    gen = torch.Generator().manual_seed(0)
    slots, fan_in, fan_out = 3, 40, 70
    a = (torch.randn(fan_in, slots * width, generator=gen) / fan_in ** 0.5).to(dtype)
    b = (torch.randn(slots * width, fan_out, generator=gen) / width ** 0.5).to(dtype)
    runs = slot_runs(pieces)
    token_slot = [s for n, s in pieces for _ in range(n)]
    assert [(s, e) for s, e, _ in runs] == _runs_of(token_slot), runs
    assert token_slots(runs, len(token_slot)) == token_slot
    T = len(token_slot)
    x = torch.randn(T, 2 * fan_in, generator=gen).to(dtype)[:, ::2]  # strided rows: copied
    base = torch.randn(T, fan_out, generator=gen).to(dtype)
    onehot, lo, hi = slot_mask(token_slot, torch.float32, "cpu")
    want = lora_delta_torch(x.float(), a.float(), b.float(), onehot, lo, hi, width,
                            out=base.float().clone())
    got = lora_delta_bgmv(x, base.clone(), a, b, torch.tensor(runs).view(-1, 3), width)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # rows of the base model are left bit for bit as they were
    plain = torch.tensor([s < 0 for s in token_slot])
    assert torch.equal(got[plain], base[plain])


def test_bgmv_refuses_bad_runs_and_shapes():
    from kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("no C++ toolchain")
    a, b = torch.zeros(8, 2 * 4), torch.zeros(2 * 4, 6)
    x, out = torch.zeros(5, 8), torch.zeros(5, 6)
    op = torch.ops.kvserve.lora_bgmv_
    for runs, needle in (([[0, 6, 0]], "out of range"), ([[0, 2, 2]], "out of range"),
                         ([[3, 2, 0]], "out of range")):
        with pytest.raises(ValueError, match=needle):
            op(out, x, a, b, torch.tensor(runs), 4)
    with pytest.raises(ValueError, match="shapes do not fit"):
        op(out, x, a, torch.zeros(8, 7), torch.tensor([[0, 1, 0]]), 4)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        op(out, x.double(), a, b, torch.tensor([[0, 1, 0]]), 4)
    op(out, x + 1, a + 1, b + 1, torch.tensor([[0, 1, 0]]), 4)  # the good twin runs
    assert out[0].eq(8 * 4).all() and out[1:].eq(0).all()


def _runs_of(token_slot):
    """Maximal runs of one adapter, written the slow way."""
    out, i = [], 0
    while i < len(token_slot):
        j = i
        while j < len(token_slot) and token_slot[j] == token_slot[i]:
            j += 1
        if token_slot[i] >= 0:
            out.append((i, j))
        i = j
    return out


# ---- slots: plain Python, step by step ----------------------------------------------------
def test_slots_refcount_lru_and_loads():
    slots = LoRASlots(2)
    assert slots.acquire("a") == 0 and slots.acquire("b") == 1
    assert slots.take_loads() == [(0, "a"), (1, "b")]
    assert slots.acquire("c") is None  # both held: c waits
    assert slots.acquire("a") == 0 and slots.refs == [2, 1] and slots.take_loads() == []
    slots.release(1)  # b free, but still holds b: a request for b needs no load
    assert slots.acquire("b") == 1 and slots.take_loads() == []
    slots.release(1)
    slots.release(0)
    slots.release(0)  # a released last: b's slot is the least recently released
    assert slots.acquire("c") == 1 and slots.take_loads() == [(1, "c")]
    assert slots.keys == ["a", "c"] and slots.in_use == 1
    with pytest.raises(ValueError, match="released more often"):
        slots.release(0)


# ---- against PEFT ---------------------------------------------------------------------
def test_each_adapter_matches_peft_logits_and_greedy_tokens(tiny_models, adapters):
    llm = lora_llm(tiny_models, max_loras=2)
    prompt = prompts([11], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, prompt_logprobs=3)
    tokens = {}
    for name in ("A", "B", None):
        lora, oracle = adapters[name]
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False,
                           lora_request=lora)[0]
        tokens[name] = out.outputs[0].token_ids
        assert tokens[name] == hf_greedy(oracle, prompt, NEW), name
        with torch.no_grad():
            ref = torch.log_softmax(oracle(torch.tensor([prompt])).logits[0].float(), -1)
        for k, entry in enumerate(out.prompt_logprobs[1:]):  # entry k: token k + 1
            for token, lp in entry.items():
                assert abs(lp.logprob - ref[k, token].item()) < 1e-4, (name, k)
    assert tokens["A"] != tokens[None] != tokens["B"]  # the adapters do change the model
    assert_no_leak(llm.engine)


def test_mixed_batch_with_arrivals_chunking_and_preemption(tiny_models, adapters):
    """[base, A, B, A, base] plus two late arrivals, small token budget and a pool small
    enough to preempt: each output equals its PEFT oracle run alone."""
    llm = lora_llm(tiny_models, max_loras=2, num_kv_blocks=14, block_size=4,
                   max_num_batched_tokens=24)
    engine = llm.engine
    names = [None, "A", "B", "A", None, "B", "A"]
    plist = prompts([9, 30, 5, 17, 23, 12, 3], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", {"prompt_token_ids": plist[i]}, params,
                           lora_request=adapters[names[i]][0])
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        if steps == 6:  # arrivals mid-decode
            for i in (5, 6):
                engine.add_request(f"r{i}", {"prompt_token_ids": plist[i]}, params,
                                   lora_request=adapters[names[i]][0])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert engine.scheduler.num_preemptions > 0
    for i, name in enumerate(names):
        assert done[f"r{i}"] == hf_greedy(adapters[name][1], plist[i], NEW), (i, name)
    assert_no_leak(engine)


def test_adapters_under_tensor_parallelism(tiny_models, adapters):
    """tp=2 (gloo, one spawned worker): each rank holds its heads' and MLP columns' part of
    every adapter. Three adapters through two slots (the loads travel with the steps), the
    base beside them, chunked prefill and preemption: each output equals its PEFT oracle."""
    from procs import children_of

    llm = lora_llm(tiny_models, max_loras=2, num_kv_blocks=14, block_size=4,
                   max_num_batched_tokens=24, tensor_parallel_size=2)
    try:
        names = [None, "A", "B", "C", "A", "C", "B"]
        plist = prompts([9, 30, 5, 17, 23, 12, 3], seed=5)
        params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in plist], params, use_tqdm=False,
                            lora_request=[adapters[n][0] for n in names])
        for i, name in enumerate(names):
            assert outs[i].outputs[0].token_ids == hf_greedy(adapters[name][1], plist[i], NEW), \
                (i, name)
        assert llm.engine.scheduler.num_preemptions > 0
        assert_no_leak(llm.engine)
    finally:
        llm.shutdown()
    assert not children_of(os.getpid())


def test_more_adapters_than_slots(tiny_models, adapters, monkeypatch):
    llm = lora_llm(tiny_models, max_loras=2)
    sched = llm.engine.scheduler
    schedule, seen = sched.schedule, []

    def recording():
        out = schedule()
        seen.append({s.request.lora_key for s in out.scheduled} - {None})
        return out
    monkeypatch.setattr(sched, "schedule", recording)
    names = ["A", "B", "C", None, "C", "A", "B", "C"]
    plist = prompts([6, 13, 8, 4, 19, 7, 10, 5], seed=5)
    outs = greedy(llm, plist, [adapters[n][0] for n in names], max_tokens=12)
    assert max(len(s) for s in seen) == 2 and any(len(s) == 2 for s in seen)
    for p, name, out in zip(plist, names, outs):
        assert out == hf_greedy(adapters[name][1], p, 12), name
    assert_no_leak(llm.engine)


def test_prefix_cache_never_crosses_adapters(tiny_models, adapters, tmp_path):
    llm = lora_llm(tiny_models, max_loras=2)
    prompt = prompts([40], seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(lora):
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False,
                           lora_request=lora)[0]
        return out.outputs[0].token_ids, out.num_cached_tokens

    import shutil

    own = str(tmp_path / "A")  # a copy: rewritten below, the shared fixture stays as it is
    shutil.copytree(adapters["A"][0].lora_path, own)
    lora_a, oracle_a = LoRARequest("A", 1, own), adapters["A"][1]
    first, cached = run(lora_a)
    assert cached == 0 and first == hf_greedy(oracle_a, prompt, 8)
    again, cached = run(lora_a)
    assert again == first and cached > 0  # A then A: a hit
    under_b, cached = run(adapters["B"][0])
    assert cached == 0 and under_b == hf_greedy(adapters["B"][1], prompt, 8)
    # A's files rewritten with other weights, same name and id: another adapter
    path = str(tmp_path / "A2")  # new weights
    oracle = save_adapter(adapters[None][1], path, seed=99, r=4, lora_alpha=8,
                          use_rslora=True, target_modules=ALL)
    for name in os.listdir(path):
        os.replace(os.path.join(path, name), os.path.join(lora_a.lora_path, name))
    reloaded, cached = run(lora_a)
    assert cached == 0 and reloaded == hf_greedy(oracle, prompt, 8) and reloaded != first
    assert_no_leak(llm.engine)


# ---- bad adapters ------------------------------------------------------------------------
def broken(path: str, adapters, how: str) -> str:
    """A copy of adapter C's files, then broken one way."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = adapters["C"][0].lora_path
    shutil.copytree(src, path)
    cfg_path, w_path = os.path.join(path, "adapter_config.json"), \
        os.path.join(path, "adapter_model.safetensors")
    cfg = json.load(open(cfg_path))
    weights = load_file(w_path)
    if how == "missing":
        os.remove(cfg_path)
    elif how == "bin":
        os.replace(w_path, os.path.join(path, "adapter_model.bin"))
    elif how in ("use_dora", "modules_to_save", "bias"):
        cfg[how] = {"use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"}[how]
    elif how == "unknown_key":
        weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    elif how == "empty":
        weights = {"base_model.model.model.norm.weight": torch.ones(64)}
    elif how == "rank":
        weights = {k: (torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16))
                   for k, v in weights.items()}
    elif how == "unpaired":
        weights = {k: v for k, v in weights.items() if "lora_B" not in k}
    json.dump(cfg, open(cfg_path, "w")) if how != "missing" else None
    if how != "bin":
        save_file(weights, w_path)
    return path


@pytest.mark.parametrize("how,needle", [
    ("missing", "adapter_config.json is missing"), ("bin", "adapter_model.bin"),
    ("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("bias", "bias='all'"),
    ("unknown_key", "lm_head.lora_A.weight' matches no projection"),
    ("empty", "norm.weight"), ("rank", "rank 16 > max_lora_rank=8"),
    ("unpaired", "without its pair"),
])
def test_bad_adapters_are_refused_by_name(tiny_models, adapters, tmp_path, how, needle):
    llm = lora_llm(tiny_models, max_loras=1)
    bad = LoRARequest("bad-one", 9, broken(str(tmp_path / how), adapters, how))
    with pytest.raises(ValueError, match="'bad-one'") as e:
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2),
                     use_tqdm=False, lora_request=bad)
    assert needle in str(e.value)
    assert greedy(llm, [[1, 2, 3]], adapters["C"][0], 4)  # and it keeps serving
    assert_no_leak(llm.engine)


def test_no_op_adapter_and_lora_off_are_refused(tiny_models, adapters, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "nothing"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({}, str(path / "adapter_model.safetensors"))
    llm = lora_llm(tiny_models, max_loras=1)
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        greedy(llm, [[1, 2]], LoRARequest("nothing", 5, str(path)), 2)
    plain = LLM(tiny_models("llama")[0], skip_tokenizer_init=True, dtype="float32",
                num_kv_blocks=64)
    with pytest.raises(ValueError, match="enable_lora=True"):
        greedy(plain, [[1, 2]], adapters["A"][0], 2)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, str(path))


def test_adapters_on_the_cpu_fast_paths(tiny_models, adapters):
    """int8 x int8 projections, fused C++ ops and a bf16 KV pool under the adapters: base
    requests are exactly what the same engine gives without LoRA; adapter requests follow
    PEFT closely (the fast paths are not fp32-exact) and differ from the base."""
    from kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("C++ CPU ops not built")
    fast = dict(quantization="int8", kv_cache_dtype="bfloat16")
    llm = lora_llm(tiny_models, max_loras=2, **fast)
    plain = LLM(tiny_models("llama")[0], skip_tokenizer_init=True, dtype="float32",
                num_kv_blocks=256, **fast)
    prompt = prompts([12], seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for name in (None, "A"):
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False,
                           lora_request=adapters[name][0])[0]
        runs[name] = out
        with torch.no_grad():
            ref = torch.log_softmax(adapters[name][1](torch.tensor([prompt])).logits[0], -1)
        err = max(abs(e[prompt[k + 1]].logprob - ref[k, prompt[k + 1]].item())
                  for k, e in enumerate(out.prompt_logprobs[1:]))
        assert err < 0.25, (name, err)
    base = plain.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert runs[None].outputs[0].token_ids == base.outputs[0].token_ids
    assert [e for e in runs[None].prompt_logprobs] == [e for e in base.prompt_logprobs]
    assert runs["A"].prompt_logprobs != runs[None].prompt_logprobs


def test_an_adapter_gone_before_its_slot_load_fails_only_its_requests(tiny_models, adapters,
                                                                      tmp_path):
    import shutil

    llm = lora_llm(tiny_models, max_loras=1)
    engine = llm.engine
    own = str(tmp_path / "A")
    shutil.copytree(adapters["A"][0].lora_path, own)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("gone", {"prompt_token_ids": [1, 2, 3]}, params,
                       lora_request=LoRARequest("A", 1, own))
    engine.add_request("base", {"prompt_token_ids": [4, 5, 6]}, params)
    shutil.rmtree(own)  # accepted, then deleted before it ever reached a slot
    engine.runner.lora.cache.clear()
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert outs["gone"].outputs[0].finish_reason == "error" and "'A'" in outs["gone"].error
    assert outs["base"].outputs[0].token_ids == hf_greedy(adapters[None][1], [4, 5, 6], 4)
    assert greedy(llm, [[7, 8]], adapters["B"][0], 4) == [hf_greedy(adapters["B"][1], [7, 8], 4)]
    assert_no_leak(engine)
