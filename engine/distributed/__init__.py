"""Tensor parallelism: the sharded group and its worker processes."""
