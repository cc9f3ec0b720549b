"""Model families, chosen from config.json's ``architectures``.

Llama, Mistral, SmolLM2, TinyLlama, Qwen2 and Qwen3 differ only in a few switches
(q/k/v bias, per-head q/k RMSNorm, explicit head_dim), so one decoder serves them all.
"""
from .llama import DecoderForCausalLM

__all__ = ["DecoderForCausalLM"]
