"""torch.compile'd decode steps on CPU: the CPU counterpart of the CUDA decode graphs.

An eager decode step on CPU spends about half its time outside the matmuls at small batch:
~60 tiny aten ops per layer (RMSNorm, rotary, dtype casts around the int4 matmuls, SiLU*up,
residual adds), each a few microseconds of dispatch. Inductor fuses them into a handful of
C++ loops per layer and calls the matmuls and the paged-attention ops (real torch ops, see
kernels/cpu_attention.py) straight from one generated wrapper.

Only steps whose every sequence has one query token go through here; prefill chunks stay
eager (their time is in the matmuls). Shapes are kept few on purpose, because every new
shape is a compile (tens of seconds on two cores):
  * the batch dimension is dynamic (one graph serves every batch size >= 2; a batch of 1 is
    its own graph, as torch specializes size 1; int4 layers switch kernels at
    ``int4_max_rows``, which splits the range once more);
  * block tables are padded to the widest a sequence can need, so their width never varies.
Graphs are compiled at start-up (``warm_up``), never in the middle of serving. Compiled code
is cached on disk by inductor, so later starts reuse it.
"""
from __future__ import annotations

import itertools
import logging
import time
import types

import torch

from .attention import AttentionMetadata

logger = logging.getLogger(__name__)
_instances = itertools.count()


class CompiledDecode:
    def __init__(self, model, backend, kv_caches: list[torch.Tensor], max_positions: int,
                 block_size: int, batch_sizes: list[int]) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.width = -(-max_positions // block_size)  # block-table columns for any sequence
        self.batch_sizes = batch_sizes  # one per graph to compile at warm-up
        self._step = torch.compile(_own_code(self._forward, next(_instances)), fullgraph=True)

    def _forward(self, input_ids, positions, slot_mapping, block_tables, seq_lens):
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=None, seq_lens=seq_lens,
            block_tables=block_tables, query_start_loc_cpu=None, seq_lens_cpu=None,
            max_query_len=1, max_seq_len=0)
        return self.model(input_ids, positions, self.kv_caches, meta, self.backend)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, check_guards: bool = False) -> torch.Tensor:
        """Hidden states [batch, hidden] for a decode-only batch."""
        tables = meta.block_tables
        if tables.shape[1] != self.width:
            padded = tables.new_zeros((tables.shape[0], self.width))
            padded[:, :tables.shape[1]] = tables
            tables = padded
        args = (input_ids, positions, meta.slot_mapping, tables, meta.seq_lens)
        if input_ids.shape[0] > 1:
            for t in args:
                torch._dynamo.mark_dynamic(t, 0)
        # After warm-up, guards only need to pick between the compiled graphs: the weights and
        # the KV pool never change identity, so checking them all every step is wasted time.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=not check_guards):
            return self._step(*args)

    @torch.inference_mode()  # as ModelRunner.execute: grad mode is part of the guards
    def warm_up(self) -> None:
        """Compile every graph now with dummy steps that store nothing (slot -1) and attend
        to nothing (length 0)."""
        for bs in self.batch_sizes:
            start = time.perf_counter()
            ids, positions = torch.zeros(bs, dtype=torch.long), torch.zeros(bs, dtype=torch.long)
            meta = AttentionMetadata(
                slot_mapping=torch.full((bs,), -1, dtype=torch.long),
                query_start_loc=None, seq_lens=torch.zeros(bs, dtype=torch.int32),
                block_tables=torch.zeros((bs, self.width), dtype=torch.int32),
                query_start_loc_cpu=None, seq_lens_cpu=None, max_query_len=1, max_seq_len=0)
            self(ids, positions, meta, check_guards=True)  # distinct: guards see aliasing
            logger.info("compiled the decode step for batch %d in %.1f s", bs,
                        time.perf_counter() - start)


def _own_code(method, n: int):
    """The bound method over a private copy of its code object. Dynamo keeps compiled graphs
    per code object, and the guard-skipping stance in __call__ only tells apart graphs of
    the same code: two engines in one process (tests, a reference model beside a quantized
    one) sharing ``_forward``'s code could run each other's graphs."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{n}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)
