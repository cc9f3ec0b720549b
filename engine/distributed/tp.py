"""One tensor-parallel group: its rank, size, and the collectives the sharded model uses.

A group is a standalone c10d process group (gloo on CPU, NCCL on CUDA) built from the
engine's own TCPStore, never torch.distributed's global default group: two TP engines can
run side by side in one process, and nothing global is left behind when one shuts down.

What each rank holds (Megatron-style, see engine/model_executor/models/llama.py):
  qkv, gate_up   column-parallel: this rank's heads / MLP columns
  o, down        row-parallel: partial sums, one all-reduce each (bias on rank 0 only)
  embedding      vocab-parallel rows, masked lookup + all-reduce
  lm_head        vocab-parallel rows, logits all-gathered
KV heads split across ranks, or are replicated when there are more ranks than KV heads.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch


@dataclass
class Shards:
    """What one rank holds of a model of these sizes (plain ints: testable without a group)."""
    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int

    def __post_init__(self) -> None:
        if self.num_heads % self.world:
            raise ValueError(f"tensor_parallel_size={self.world} does not divide the "
                             f"{self.num_heads} attention heads.")
        if self.num_kv_heads % self.world and self.world % self.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={self.world} and the {self.num_kv_heads} "
                             f"KV heads: one must divide the other.")
        if self.intermediate % self.world:
            raise ValueError(f"tensor_parallel_size={self.world} does not divide the MLP's "
                             f"{self.intermediate} columns.")

    @property
    def heads(self) -> tuple[int, int]:
        """(first, count) of this rank's query heads."""
        n = self.num_heads // self.world
        return self.rank * n, n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """(first, count) of this rank's KV heads: a slice, or one replicated head."""
        if self.num_kv_heads % self.world == 0:
            n = self.num_kv_heads // self.world
            return self.rank * n, n
        return self.rank // (self.world // self.num_kv_heads), 1

    @property
    def columns(self) -> tuple[int, int]:
        """(first, count) of this rank's MLP columns."""
        n = self.intermediate // self.world
        return self.rank * n, n

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """(first, count) of this rank's vocabulary rows; every rank holds the same count
        (the last one padded), so logits gather into equal pieces."""
        per = -(-self.vocab // self.world)
        return self.rank * per, per


class TPGroup:
    """The collectives of one TP engine. ``pg`` (gloo) carries the step inputs and small CPU
    values; ``device_pg`` (NCCL on CUDA), when there is one, the activations."""

    def __init__(self, rank: int, world: int, pg, device_pg=None) -> None:
        self.rank, self.world, self.pg, self.device_pg = rank, world, pg, device_pg
        self.num_collectives = 0  # counted: tests check 2 per layer + embedding + logits
        self.num_device_collectives = 0

    def _activations_pg(self):
        if self.device_pg is None:
            return self.pg
        self.num_device_collectives += 1
        return self.device_pg

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.num_collectives += 1
        self._activations_pg().allreduce([t]).wait()
        return t

    def gather_rows(self, t: torch.Tensor, vocab: int) -> torch.Tensor:
        """[R, per] on every rank -> [R, vocab] (each rank's vocab slice side by side)."""
        self.num_collectives += 1
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._activations_pg().allgather([parts], [t.contiguous()]).wait()
        return torch.cat(parts, dim=-1)[:, :vocab]

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        from torch.distributed import ReduceOp

        opts = _reduce_opts(ReduceOp.MIN)
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast_object(self, obj=None):
        """Rank 0's object on every rank (pickled; two broadcasts: size, then bytes)."""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(data)], dtype=torch.int64)
            self.pg.broadcast(size, 0).wait()
            self.pg.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0).wait()
            return obj
        size = torch.zeros(1, dtype=torch.int64)
        self.pg.broadcast(size, 0).wait()
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self.pg.broadcast(buf, 0).wait()
        return pickle.loads(buf.numpy().tobytes())


def _reduce_opts(op):
    from torch.distributed import AllreduceOptions

    opts = AllreduceOptions()
    opts.reduceOp = op
    return opts
