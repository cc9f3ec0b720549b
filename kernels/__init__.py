"""Attention kernels over the paged KV cache: Triton kernels and their torch references."""
