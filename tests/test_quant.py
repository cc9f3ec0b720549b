"""quantization="int4" and "int8": GGUF codes recovered exactly (int4), the int8 op against its
torch reference, accuracy against fp32 on the real model, every architecture wired."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_executor.loader import load_model
from engine.model_executor.quant import (Int4Linear, pack_w8a8, quantize_int4,
                                         quantize_w8a8, w8a8_linear_torch)
from kernels import cpu_ops
from test_bf16 import TEXT, teacher_forced_logits


def test_int4_recovers_gguf_q4_1_codes(smol_llm):
    engine = smol_llm.engine
    model = load_model(engine.model_dir, engine.model_config, torch.float32, torch.device("cpu"))
    w = model.model.layers[3].mlp.gate_up_proj.weight.detach()  # Q4_1 in the file
    codes, sz = quantize_int4(w)
    n, k = w.shape
    deq = (codes.float().view(n, k // 32, 32) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    assert torch.equal(deq.view(n, k), w)  # lossless: the file's own 4-bit weights
    lin = Int4Linear(w, None, max_rows=4, batch_hint=8)
    x = torch.randn(3, k)
    ref = x.to(torch.bfloat16).float() @ w.t()
    assert (lin(x) - ref).abs().max() < 0.02 * ref.abs().max()  # int4 path (bf16 activations)
    x_big = torch.randn(16, k)
    assert torch.allclose(lin(x_big), x_big @ w.t(), atol=1e-4)  # dense fp32 path


def test_int4_accuracy_against_fp32(smol_llm):
    """Teacher-forced over 320 positions with every step on the int4 path."""
    ref_llm = LLM(dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024)
    ids = ref_llm.tokenizer.encode(TEXT * 7)[:320]
    ref = teacher_forced_logits(ref_llm, ids)
    q = LLM(dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024,
            quantization="int4", int4_max_rows=1024)
    ours = teacher_forced_logits(q, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert agree >= 0.98 and kl < 0.01, (agree, kl)
    out = q.chat([{"role": "user", "content": "What is the capital of France?"}],
                 SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_quantization_option_checks():
    from engine import EngineConfig

    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    for q in ("int4", "int8", "int4+int8"):
        with pytest.raises(ValueError, match="CPU only"):
            EngineConfig(quantization=q, device="cuda")
    for q in ("int8", "int4+int8"):
        with pytest.raises(ValueError, match="float32 activations"):
            EngineConfig(quantization=q, dtype="bfloat16")
        assert EngineConfig(quantization=q).torch_dtype == torch.float32


# Varied text (prose, numbers, code, Q&A): teacher-forced agreement on TEXT * 7 alone is
# flattered by its repetition.
VARIED = ("Paris is the capital and most populous city of France. It is located on the Seine "
          "river, in the north of the country. The Louvre received 8.9 million visitors in 2023. "
          "To install the package, run pip install requests, then call requests.get(url). "
          "Q: How many legs does a spider have? A: Spiders have eight legs, while insects have "
          "six. Water boils at 100 degrees Celsius at sea level, but at lower temperatures on "
          "high mountains because the air pressure is lower. ")


@pytest.mark.skipif(not cpu_ops.has_w8a8(), reason="no C++ toolchain or no AVX-512 VNNI")
@pytest.mark.parametrize("rows,k,n,num_outliers,with_bias",
                         [(0, 64, 96, 4, False), (1, 64, 96, 0, True), (5, 70, 33, 4, True),
                          (9, 100, 50, 2, False), (33, 576, 160, 16, False),
                          (130, 68, 96, 4, True)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_w8a8_op_matches_torch_reference(rows, k, n, num_outliers, with_bias, dynamic):
    """K and N off the 16-lane width exercise the scalar tails; N off the GEMM's 48-column
    panels, rows off its 8-row tiles and across its 128-row chunks, the partial tiles. Outlier
    channels 100x larger than the rest must not coarsen the others (the scale excludes them).
    Fixed outliers come
    from calibration; dynamic ones are each row's largest entries, here spikes in a different
    channel per row, which no fixed set could catch."""
    torch.manual_seed(rows + k)
    w, x = torch.randn(n, k) * 0.1, torch.randn(rows, k)
    if dynamic:
        # `dyn` spikes of different sizes per row, anywhere (the first 16 entries included):
        # one the op failed to take out would set the row's scale and coarsen the rest.
        dyn = max(num_outliers, 1)
        for r in range(rows):
            spots = torch.randperm(k)[:dyn]
            x[r, spots] = torch.sign(x[r, spots]) * (20 + 10 * torch.arange(dyn).float())
        args = quantize_w8a8(w, torch.rand(k), 0)
        extra = (w.t().to(torch.bfloat16).contiguous(), dyn)
    else:
        hot = torch.randperm(k)[:num_outliers]
        x[:, hot] *= 100
        absmax = x.abs().amax(0) if rows else torch.rand(k)
        args = quantize_w8a8(w, absmax, num_outliers)
        if rows:
            assert set(args[2].tolist()) == set(hot.tolist())
        extra = (None, 0)
    bias = torch.randn(n) if with_bias else None
    args = (*args, bias, *extra)
    w_packed, wo_packed = pack_w8a8(args[0], args[3])
    packed = (x, w_packed, *args[1:3], wo_packed, *args[4:])
    ours = torch.ops.kvserve.w8a8_linear(*packed)
    ref = w8a8_linear_torch(x, *args)
    exact = x @ w.t() + (0 if bias is None else bias)
    assert ours.shape == (rows, n)
    if rows:
        # Same codes up to a rare +-1 from x * (1/s) vs x / s; both within 1% of fp32.
        scale = exact.abs().max()
        assert (ours - ref).abs().max() <= 2e-3 * scale
        assert (ours - exact).abs().max() <= 1e-2 * scale
    assert torch.ops.kvserve.w8a8_linear(x.view(rows, 1, k), *packed[1:]).shape == (rows, 1, n)


def test_int8_accuracy_against_fp32(smol_llm):
    """Teacher-forced on varied text: int8 activations cost about what bf16 does (engine/model_executor/quant.py
    has the measurements: 98.4% top-1, KL 0.0018 on this text)."""
    ref_llm = LLM(dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024)
    ids = ref_llm.tokenizer.encode(VARIED * 3)[:320]
    ref = teacher_forced_logits(ref_llm, ids)
    q = LLM(enable_prefix_caching=False, max_num_batched_tokens=1024, quantization="int8")
    ours = teacher_forced_logits(q, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert len(ids) == 320 and agree >= 0.975 and kl < 0.0025, (agree, kl)
    out = q.chat([{"role": "user", "content": "What is the capital of France?"}],
                 SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_int8_wires_every_architecture(tiny_models, arch, monkeypatch):
    """Biases (qwen2), q/k norms (qwen3), GQA and sliding windows through the int8 layers.
    With every input channel kept as a fixed fp32 "outlier" the layers compute exactly x W^T, so
    the logits must equal transformers' (this checks the wiring); with the real setting the
    random tiny models (no outlier structure, activations ~10) still agree on >= 85%."""
    import engine.model_executor.model_runner
    import engine.model_executor.quant
    from test_parity_tiny import tiny_llm

    hf = tiny_models(arch)[1]
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    agree = {}
    real = (engine.model_executor.quant.INT8_OUTLIERS, engine.model_executor.quant.INT8_DYNAMIC_OUTLIERS)
    for outliers, dynamic in ((10 ** 6, {}), real):
        monkeypatch.setattr(engine.model_executor.quant, "INT8_OUTLIERS", outliers)
        monkeypatch.setattr(engine.model_executor.model_runner, "INT8_DYNAMIC_OUTLIERS", dynamic)
        llm = tiny_llm(tiny_models, arch, quantization="int8", enable_prefix_caching=False)
        modules = list(llm.engine.runner.model.modules())
        assert any(type(m).__name__ == "W8A8Linear" for m in modules)
        # the fused C++ norm / rotary / SiLU*up ops are on, so these logits check them too
        assert all(m.fused for m in modules if hasattr(m, "fused")) == cpu_ops.available()
        ours = teacher_forced_logits(llm, ids)
        agree[outliers] = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        if outliers == 10 ** 6:
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert agree[10 ** 6] == 1.0 and agree[engine.model_executor.quant.INT8_OUTLIERS] >= 0.85, agree


def test_int4_plus_int8_picks_the_kernel_by_rows(tiny_models):
    """int4 up to int4_max_rows rows, the int8 x int8 layer above (down_proj's with per-row
    outliers); lm_head is int8 x int8 at every size."""
    from engine.model_executor.quant import W8A8Linear
    from test_parity_tiny import tiny_llm

    llm = tiny_llm(tiny_models, "llama", quantization="int4+int8", int4_max_rows=4)
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    assert isinstance(qkv, Int4Linear) and isinstance(qkv.dense, W8A8Linear)
    assert isinstance(down, Int4Linear) and isinstance(down.dense, W8A8Linear)
    assert down.dense.dynamic > 0 and qkv.dense.dynamic == 0
    assert isinstance(model.lm_head, W8A8Linear)  # faster than weight-only int8 at any size
    attn = tiny_models("llama")[1].model.layers[0].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    calls = []
    qkv.dense.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    x = torch.randn(9, w.shape[1])
    small, large = qkv(x[:4]), qkv(x)
    assert calls == [9]  # only the 9-row call went to the int8 layer
    for ours, tol in ((small, 0.1), (large, 0.02)):  # int4 of random weights is coarser
        ref = x[:len(ours)] @ w.t()
        assert (ours - ref).norm() / ref.norm() < tol
