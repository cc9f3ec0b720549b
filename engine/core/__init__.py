"""Tensor-free bookkeeping: what the scheduler decides, in plain Python (no torch import)."""
