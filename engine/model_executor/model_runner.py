"""The only place scheduler state becomes tensors: one flattened batch per step.

For the scheduled requests (in order) it builds
    input_ids[T], positions[T], slot_mapping[T]       T = tokens this step, all requests
    query_start_loc[B+1], seq_lens[B], block_tables[B, max_blocks]
runs the model, computes logits only at the last token of each chunk that samples,
and samples them.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.lora import slot_runs

from ..core.config import EngineConfig
from ..core.kv_cache_manager import KVCacheManager
from ..core.request import Request
from ..core.scheduler import SchedulerOutput
from .attention import AttentionMetadata, get_backend
from .calibration import input_absmax
from .cpu_compile import CompiledDecode
from .cpu_linear import pack_linears
from .loader import load_model
from .malloc_tuning import keep_freed_memory
from .model_config import ModelConfig
from .models.llama import cpu_fused_ops, triton_fused_ops, use_fused_ops
from .quant import (
    INT8_DYNAMIC_OUTLIERS,
    LM_HEAD_INT8_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    supports_int4,
)
from .sampler import Sampler, SamplerOutput, to_device

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30
MIXED_GRAPH_MAX_TOKENS = 512  # steps with prefill chunks up to this many tokens replay graphs


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: str,
                 tp=None, workers=None) -> None:
        """``tp``: this rank's tensor-parallel group (None: the whole model here);
        ``workers``: on rank 0, the other ranks (engine/distributed/workers.py)."""
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_torch_dtype
        self.block_size = config.block_size
        self.tp, self.workers = tp, workers
        if tp is not None:
            from ..distributed.step import TableMirror, TableSender

            self.tables = TableMirror()
            self.sender = TableSender() if tp.rank == 0 else None
        self.model = load_model(model_dir, model_config, self.dtype, self.device, tp)
        if self.device.type == "cpu":
            keep_freed_memory()
            self._pack_cpu_weights()
            if config.quantization and self.dtype == torch.float32:
                from kernels import cpu_ops

                if cpu_ops.available():  # not fp32-exact: only where outputs are not anyway
                    use_fused_ops(self.model, cpu_fused_ops())
        self.lora = None
        if config.enable_lora:  # on top of the packed / quantized base layers
            from ..lora.layers import LoRAModel

            self.lora = LoRAModel(self.model, config.max_loras, config.max_lora_rank,
                                  config.max_cpu_loras or config.max_loras, self.dtype,
                                  self.device)
        self.backend = get_backend(config.backend_name, model_config.head_dim,
                                   model_config.sliding_window)
        if self.backend.name == "triton":  # norms, rotary, SiLU * up: one launch each
            use_fused_ops(self.model, triton_fused_ops())
        self.sampler = Sampler(model_config.vocab_size)
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self._graphs: dict[int, tuple] = {}  # padded batch size -> (CUDA graph, its output)
        self._mixed_graphs: dict[int, tuple] = {}  # padded token count -> (graph, output)
        self._compiled: CompiledDecode | None = None  # CPU: torch.compile'd decode steps

    def _pack_cpu_weights(self) -> None:
        """oneDNN-prepacked weights for every linear layer, lm_head included (a tied lm_head
        gets its own copy; the embedding keeps the plain one for lookups). With
        quantization="int4", each layer also gets int4 weights for small batches; with "int8",
        every projection (lm_head included) becomes an int8 x int8 layer;
        "int4+int8" is int4 up to int4_max_rows rows and those int8 layers above."""
        hint = self.config.max_num_seqs
        quant = self.config.quantization or ""
        if self.model.lm_head is None:  # tied: an lm_head module over the embedding
            embed = self.model.model.embed_tokens.weight
            self.model.lm_head = nn.Linear(embed.shape[1], embed.shape[0], bias=False,
                                           device="meta")
            self.model.lm_head.weight = embed
        int8 = self._w8a8_layers() if "int8" in quant else {}
        if "int4" in quant:
            rows = self.config.int4_max_rows
            for parent in list(self.model.model.modules()):  # not lm_head: see engine/model_executor/quant.py
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear) and supports_int4(child.weight):
                        large = int8.pop((parent, name), None)
                        setattr(parent, name, Int4Linear(child.weight, child.bias, rows, hint,
                                                         dense=large))
            # int8 lm_head (see engine/model_executor/quant.py): the W8A8 one if there is one (~2x faster
            # than weight-only int8 at every row count), else weight-only int8 for a few rows.
            if (self.model, "lm_head") not in int8:
                self.model.lm_head = Int8Linear(self.model.lm_head.weight,
                                                min(rows, LM_HEAD_INT8_MAX_ROWS), hint)
        for (parent, name), layer in int8.items():
            setattr(parent, name, layer)
        pack_linears(self.model, batch_hint=hint)

    def _w8a8_layers(self) -> dict[tuple[nn.Module, str], W8A8Linear]:
        """(parent, attribute) -> its int8 x int8 replacement, calibrated on this model."""
        from kernels import cpu_ops

        targets = [(parent, name, child) for parent in list(self.model.modules())
                   for name, child in parent.named_children()
                   if isinstance(child, nn.Linear)]
        absmax = input_absmax(self.model, [child for _, _, child in targets],
                              self.model_config.vocab_size)
        native = cpu_ops.has_w8a8()
        return {(parent, name): W8A8Linear(child.weight, child.bias, absmax[child], native,
                                           INT8_DYNAMIC_OUTLIERS.get(name, 0))
                for parent, name, child in targets}

    @property
    def num_kv_heads(self) -> int:
        """KV heads held here (this rank's, under tensor parallelism)."""
        return self.model.model.layers[0].self_attn.num_kv_heads

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model_config
        per_token = 2 * self.num_kv_heads * cfg.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size * cfg.num_hidden_layers

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held on the device: weights (every tensor the model's modules hold, shared
        ones counted once) and the KV pool. The registry checks budgets against these."""
        seen, weights = set(), 0
        for module in self.model.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                       *(t for t in vars(module).values() if isinstance(t, torch.Tensor))]
            for t in tensors:
                try:
                    key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                except NotImplementedError:  # oneDNN's prepacked weights have no storage
                    key, size = id(t), t.numel() * t.element_size()
                if key not in seen:
                    seen.add(key)
                    weights += size
        kv = sum(t.untyped_storage().nbytes() for t in self.kv_caches)
        return {"weights": weights, "kv_cache": kv}

    def allocate_kv_cache(self) -> int:
        """Preallocate the pool: one [2, num_blocks, block_size, kv_heads, head_dim] per layer.
        On CUDA, then capture the CUDA graphs (unless enforce_eager)."""
        self.model.init_rotary(self._max_positions(), self.device)
        self.num_blocks = self.config.num_kv_blocks or self._blocks_from_budget()
        if self.tp is not None:  # one block table for all ranks: the smallest pool wins
            self.num_blocks = self.tp.min_int(self.num_blocks)
        cfg = self.model_config
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(cfg.num_hidden_layers)]
        if self.device.type == "cuda" and not self.config.enforce_eager and self.tp is None:
            self._capture_graphs()  # which also compiles every kernel variant they hold
        elif self.device.type == "cuda" and self.tp is None and self.backend.name == "triton":
            self._warm_up_decode()
        if self.config.cpu_compile:
            self._compile_decode()
        return self.num_blocks

    def _compile_decode(self) -> None:
        if not getattr(self.backend, "native", False):
            logger.warning("cpu_compile needs the C++ CPU attention ops (backend 'cpu'); "
                           "running eagerly.")
            return
        # One graph per batch-size range the model branches on (see engine/model_executor/cpu_compile.py).
        largest = min(self.config.max_num_seqs, self.config.cpu_compile_max_batch or 1 << 30)
        sizes = {1, min(2, largest)}
        if "int4" in (self.config.quantization or "") and self.config.int4_max_rows < largest:
            sizes.add(max(2, self.config.int4_max_rows + 1))
        self._compiled = CompiledDecode(self.model, self.backend, self.kv_caches,
                                        self._max_positions(), self.block_size, sorted(sizes))
        self._compiled.warm_up()

    def _blocks_from_budget(self) -> int:
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block "
                             f"({self.bytes_per_block} bytes each).")
        return num_blocks

    # ---- CUDA: memory profiling and decode CUDA graphs --------------------------------------
    def _dummy_batch(self, num_tokens: int, num_seqs: int):
        """A batch that stores nothing (slot -1) and reads only block 0 of the pool: prefill
        sequences of num_tokens // num_seqs tokens (the first takes the remainder)."""
        dev = self.device
        q_lens = [num_tokens // num_seqs] * num_seqs
        q_lens[0] += num_tokens - sum(q_lens)
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        width = -(-max(q_lens) // self.block_size)
        positions = torch.cat([torch.arange(n) for n in q_lens]) % self._max_positions()
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(q_lens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((num_seqs, width), dtype=torch.int32, device=dev),
            query_start_loc_cpu=qsl, seq_lens_cpu=q_lens,
            max_query_len=max(q_lens), max_seq_len=max(q_lens))
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        return ids, positions.to(dev), meta

    @torch.inference_mode()
    def _warm_up_decode(self) -> None:
        """Eager CUDA: compile the decode kernel variants now, not under the first requests
        (the split-KV count, a constexpr, follows the batch size; the profiling forward has
        already compiled the prefill ones). Dummy steps store nothing and read block 0."""
        for bs in self._graph_batch_sizes():
            ids, positions, meta = self._dummy_batch(bs, bs)
            self.model(ids, positions, self.kv_caches, meta, self.backend)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _cuda_kv_budget(self) -> int:
        """Bytes for the KV pool: total * gpu_memory_utilization, less the peak of a forward
        pass at max_num_batched_tokens (weights + activations + logits) and less what other
        users of the device (CUDA context, other processes) hold."""
        dev = self.device
        cfg = self.model_config
        num_tokens = self.config.max_num_batched_tokens
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        dummy = torch.zeros((2, 1, self.block_size, self.num_kv_heads, cfg.head_dim),
                            dtype=self.dtype, device=dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        ids, positions, meta = self._dummy_batch(num_tokens, num_seqs)
        hidden = self.model(ids, positions, [dummy] * cfg.num_hidden_layers, meta, self.backend)
        rows = meta.query_start_loc[1:].long() - 1
        torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)  # sampler
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del hidden, dummy
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = max(0, total - free - torch.cuda.memory_reserved(dev))
        budget = int(total * self.config.gpu_memory_utilization) - peak - non_torch
        logger.info("CUDA memory: total %.2f GiB, forward peak %.2f GiB, non-torch %.2f GiB, "
                    "KV budget %.2f GiB", total / 2**30, peak / 2**30, non_torch / 2**30,
                    budget / 2**30)
        if budget < self.bytes_per_block:
            raise ValueError(
                f"no room for the KV cache: {self.config.gpu_memory_utilization:.2f} of "
                f"{total / 2**30:.1f} GiB minus the forward peak ({peak / 2**30:.2f} GiB) and "
                f"other use ({non_torch / 2**30:.2f} GiB) leaves {max(budget, 0)} bytes; raise "
                "gpu_memory_utilization or lower max_num_batched_tokens.")
        return budget

    def _graph_batch_sizes(self) -> list[int]:
        sizes, n = [], 1
        while n < self.config.max_num_seqs:
            sizes.append(n)
            n *= 2
        return sizes + [self.config.max_num_seqs]

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """CUDA graphs over shared static buffers:

        - decode: one per padded batch size for steps whose every sequence has one query
          token; padding sequences get slot -1 (store nothing), seq_len 0 (attend to nothing,
          output 0) and query_len 1, so their query_start_loc is 0, 1, ..., n for every
          decode step and is written once here;
        - mixed: one per padded token count for steps with prefill chunks (under load, most
          steps), over all max_num_seqs sequence slots (see _mixed_graph_args)."""
        if self.backend.name != "triton":
            return  # the torch backend reads host lists and syncs: not capturable
        dev = self.device
        max_bs = self.config.max_num_seqs
        max_tokens = max([max_bs] + self._mixed_graph_sizes())
        width = -(-self._max_positions() // self.block_size)
        self._g_ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self._g_slots = torch.full((max_tokens,), -1, dtype=torch.long, device=dev)
        self._g_qsl = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)  # decode: fixed
        self._m_qsl = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)   # mixed: per step
        self._g_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros((max_bs, width), dtype=torch.int32, device=dev)
        pool = torch.cuda.graph_pool_handle()
        mixed = {t: self._capture(pool, self._mixed_graph_args(t), f"mixed step of {t} tokens")
                 for t in sorted(self._mixed_graph_sizes(), reverse=True)}  # largest first
        graphs = {bs: self._capture(pool, self._graph_args(bs), f"decode batch size {bs}")
                  for bs in sorted(self._graph_batch_sizes(), reverse=True)}
        torch.cuda.synchronize(dev)
        self._graphs, self._mixed_graphs = graphs, mixed
        logger.info("captured CUDA graphs: decode batch sizes %s, mixed steps of %s tokens",
                    sorted(graphs), sorted(mixed))

    def _capture(self, pool, args: tuple, what: str) -> tuple:
        """(graph, its output) of one forward on the static buffers in ``args``."""
        try:
            self.model(*args)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
        except Exception as e:
            # Loud, not a warning: eager steps are 3-4x slower, and a capture failure is a
            # bug (a host sync or an allocation the graph cannot hold) to be fixed.
            raise RuntimeError(
                f"CUDA graph capture failed at {what}: {e!r}. Serve without graphs with "
                "enforce_eager=True (--enforce-eager).") from e
        return graph, out

    def _mixed_graph_sizes(self) -> list[int]:
        """Token counts of the mixed-step graphs (steps with a prefill chunk): powers of two
        from 16 up to MIXED_GRAPH_MAX_TOKENS, within the step budget. Bigger steps run
        eagerly, where launch overhead is small next to the work."""
        cap = min(MIXED_GRAPH_MAX_TOKENS, self.config.max_num_batched_tokens)
        sizes, n = [], 16
        while n < cap:
            sizes.append(n)
            n *= 2
        return sizes + [cap]

    def _mixed_graph_args(self, tokens: int) -> tuple:
        """A mixed step of ``tokens`` (padded) rows over all max_num_seqs sequence slots: the
        unified kernel's grid depends on those two shapes only, and padding slots have no
        queries (query_start_loc repeats the last real offset) and no keys (seq_len 0)."""
        max_bs = self.config.max_num_seqs
        meta = AttentionMetadata(
            slot_mapping=self._g_slots[:tokens], query_start_loc=self._m_qsl,
            seq_lens=self._g_lens, block_tables=self._g_tables,
            query_start_loc_cpu=[0] * (max_bs + 1), seq_lens_cpu=[0] * max_bs,
            max_query_len=tokens, max_seq_len=0)  # max_query_len > 1: never the split path
        return self._g_ids[:tokens], self._g_pos[:tokens], self.kv_caches, meta, self.backend

    def _replay_mixed_graph(self, input_ids, positions, meta: AttentionMetadata):
        """Hidden states for a step with prefill chunks through the smallest mixed graph that
        holds its tokens, or None (the caller runs eagerly)."""
        n, b = input_ids.shape[0], len(meta.seq_lens_cpu)
        sizes = [t for t in self._mixed_graphs if t >= n]
        width = meta.block_tables.shape[1]
        if not sizes or width > self._g_tables.shape[1] or b > self._g_lens.shape[0]:
            return None
        t = min(sizes)
        graph, out = self._mixed_graphs[t]
        self._fill_static(input_ids, positions, meta, t, self._g_lens.shape[0])
        self._m_qsl[:b + 1].copy_(meta.query_start_loc)
        self._m_qsl[b + 1:].fill_(n)  # padding sequences: no queries (and no keys, above)
        graph.replay()
        return out[:n]

    def _fill_static(self, input_ids, positions, meta: AttentionMetadata, tokens: int,
                     seqs: int) -> None:
        """A step's inputs into the static buffers of a graph of ``tokens`` rows over
        ``seqs`` sequences; padding rows take token 0 at position 0 and are stored nowhere
        (slot -1), padding sequences have no keys (seq_len 0)."""
        n, b = input_ids.shape[0], len(meta.seq_lens_cpu)
        width = meta.block_tables.shape[1]
        self._g_ids[:n].copy_(input_ids)
        self._g_pos[:n].copy_(positions)
        self._g_slots[:n].copy_(meta.slot_mapping)
        self._g_lens[:b].copy_(meta.seq_lens)
        self._g_tables[:b, :width].copy_(meta.block_tables)
        if tokens > n:
            self._g_ids[n:tokens].zero_()
            self._g_pos[n:tokens].zero_()
            self._g_slots[n:tokens].fill_(-1)
        if seqs > b:
            self._g_lens[b:seqs].zero_()

    def _graph_args(self, bs: int) -> tuple:
        """The model's arguments for a captured batch of bs: views of the static buffers."""
        meta = AttentionMetadata(
            slot_mapping=self._g_slots[:bs], query_start_loc=self._g_qsl[:bs + 1],
            seq_lens=self._g_lens[:bs], block_tables=self._g_tables[:bs],
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[0] * bs,
            max_query_len=1, max_seq_len=0)
        return self._g_ids[:bs], self._g_pos[:bs], self.kv_caches, meta, self.backend

    def _replay_decode_graph(self, input_ids, positions, meta: AttentionMetadata):
        """Hidden states for a decode-only batch through the smallest captured graph that
        fits, or None when none does (the caller runs eagerly)."""
        n = len(meta.seq_lens_cpu)
        sizes = [bs for bs in self._graphs if bs >= n]
        width = meta.block_tables.shape[1]
        if not sizes or width > self._g_tables.shape[1]:
            return None
        bs = min(sizes)
        graph, out = self._graphs[bs]
        self._fill_static(input_ids, positions, meta, bs, bs)  # one token per sequence
        graph.replay()
        return out[:n]

    def _max_positions(self) -> int:
        return max(self.config.max_model_len or 0, self.model_config.max_position_embeddings) + 1

    def add_generator(self, req: Request) -> None:
        if req.sampling_params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.sampling_params.seed + req.index)
            self.generators[req.request_id] = gen

    def drop_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        if self.tp is not None:
            self.sender.drop(request_id)

    def generator_states(self, reqs: list[Request]) -> dict[str, torch.Tensor]:
        """The seeded requests' generator states, to rewind them if a step is re-run."""
        return {r.request_id: self.generators[r.request_id].get_state()
                for r in reqs if r.request_id in self.generators}

    def set_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        for request_id, state in states.items():
            if request_id in self.generators:
                self.generators[request_id].set_state(state)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, kv: KVCacheManager
                ) -> tuple[list[Request], SamplerOutput | None, dict]:
        """(the requests that sampled, their SamplerOutput or None, prompt logprobs by
        request id for the chunks that wanted them)."""
        if self.lora is not None:
            sched = self._group_by_adapter(sched)
        if self.tp is not None:
            return self._execute_tp(sched, kv)
        input_ids, positions, meta, logits_rows, sampling_reqs = self._prepare(sched, kv)
        hidden = None
        runs = None
        if self.lora is not None:
            runs = self._lora_runs(sched)
            self.lora.set_step(runs, len(input_ids))
        if runs:
            pass  # adapter tokens: eager (graphs and compiled steps hold the base model only)
        elif self._graphs and meta.max_query_len == 1:
            hidden = self._replay_decode_graph(input_ids, positions, meta)
        elif self._mixed_graphs:
            hidden = self._replay_mixed_graph(input_ids, positions, meta)
        elif (self._compiled is not None and meta.max_query_len == 1
              and len(input_ids) <= (self.config.cpu_compile_max_batch or len(input_ids))):
            hidden = self._compiled(input_ids, positions, meta)
        if hidden is None:
            hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        prompt_lps = self._prompt_logprobs(sched, hidden)
        if not sampling_reqs:
            return [], None, prompt_lps
        logits = self.model.compute_logits(hidden[logits_rows])
        return sampling_reqs, self.sampler(logits, sampling_reqs, self.generators), prompt_lps

    def _execute_tp(self, sched: SchedulerOutput, kv: KVCacheManager):
        """Rank 0 under tensor parallelism: send the step, run this rank's part (every rank
        computes the same logit rows: the lm_head gather is a collective), sample here."""
        seqs, tables, sample_rows, sampling_reqs = [], [], [], []
        row = 0
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            seqs.append((req.request_id, req.token_ids[start:start + s.num_tokens], start))
            tables.append(kv.block_ids(req.request_id))
            row += s.num_tokens
            if s.samples:
                sample_rows.append(row - 1)
                sampling_reqs.append(req)
        spans = self._prompt_spans(sched)
        prompt_rows = [r for *_, rows in spans for r in rows]
        step = self.sender.encode(seqs, tables, prompt_rows + sample_rows)
        if self.lora is not None:
            step.lora_runs, step.lora_loads = self._lora_runs(sched), self.lora.take_pending()
        self.workers.send(step)
        try:
            logits = self.forward_step(step)
        except Exception as e:  # noqa: BLE001 - the ranks may be stuck between collectives
            raise self.workers.failure(e) from e
        # From here on only rank 0 works (the others wait for the next step), so a failure
        # below is an ordinary one: the engine may re-run halves of this step to find it.
        prompt_lps, at = {}, 0
        for req, first, last, rows in spans:
            part = logits[at:at + len(rows)]
            at += len(rows)
            prompt_lps[req.request_id] = self._prompt_entries(req, first, last, part)
        if not sampling_reqs:
            return [], None, prompt_lps
        return (sampling_reqs, self.sampler(logits[at:], sampling_reqs, self.generators),
                prompt_lps)

    @torch.inference_mode()
    def forward_step(self, step) -> torch.Tensor | None:
        """Every rank: this rank's part of one step (engine/distributed/step.py); the
        logits of step.logit_rows over the whole vocabulary, or None if there are none."""
        tables = self.tables.apply(step)
        input_ids, positions, meta = self._batch([ids for _, ids, _ in step.seqs],
                                                 [start for _, _, start in step.seqs], tables)
        if self.lora is not None:
            if self.tp.rank != 0:  # rank 0 wrote its slots when the engine asked
                for slot, adapter in step.lora_loads:
                    self.lora.write_slot(slot, adapter)
            self.lora.set_step(step.lora_runs, len(input_ids))
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not step.logit_rows:
            return None
        rows = torch.tensor(step.logit_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden[rows])

    @staticmethod
    def _group_by_adapter(sched: SchedulerOutput) -> SchedulerOutput:
        """The step's requests with each adapter's tokens next to each other (stable), so the
        LoRA layers see one run per adapter. Safe: every layer stores the whole step's K/V
        before any row attends, so row order within a step does not change what is read."""
        def slot(s):
            return -1 if s.request.lora_slot is None else s.request.lora_slot
        return SchedulerOutput(sorted(sched.scheduled, key=slot), sched.preempted)

    @staticmethod
    def _lora_runs(sched: SchedulerOutput) -> list[tuple[int, int, int]] | None:
        """The step's runs of one adapter slot, (start row, end row, slot); None if no token
        has an adapter."""
        if all(s.request.lora_slot is None for s in sched.scheduled):
            return None
        return slot_runs([(s.num_tokens, -1 if s.request.lora_slot is None
                           else s.request.lora_slot) for s in sched.scheduled])

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor) -> dict:
        """request id -> [(logprob, rank, top ids, top logprobs)] of the prompt tokens this
        step's chunk predicts (position p predicts token p + 1), for requests that want them."""
        out = {}
        for req, first, last, rows in self._prompt_spans(sched):
            rows_t = torch.tensor(rows, dtype=torch.long, device=hidden.device)
            out[req.request_id] = self._prompt_entries(
                req, first, last, self.model.compute_logits(hidden[rows_t]))
        return out

    @staticmethod
    def _prompt_spans(sched: SchedulerOutput) -> list[tuple[Request, int, int, list[int]]]:
        """(request, first, last, batch rows) for each chunk whose prompt tokens first+1 ..
        last want logprobs (position p predicts token p + 1)."""
        spans, row = [], 0
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            first = max(start, len(req.prompt_logprobs))  # after a preemption: no repeats
            last = min(start + s.num_tokens, req.num_prompt_tokens - 1)  # exclusive
            if req.needs_prompt_logprobs and first < last:
                spans.append((req, first, last, list(range(row + first - start,
                                                           row + last - start))))
            row += s.num_tokens
        return spans

    @staticmethod
    def _prompt_entries(req: Request, first: int, last: int, logits: torch.Tensor) -> list:
        """(logprob, rank, top ids, top logprobs) of prompt tokens first+1 .. last."""
        logprobs = torch.log_softmax(logits.float(), -1)
        targets = torch.tensor(req.token_ids[first + 1:last + 1], device=logits.device)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
        n = req.sampling_params.prompt_logprobs
        top_vals, top_ids = logprobs.topk(n, dim=-1) if n else (None, None)
        return [(c, r, top_ids[i].tolist() if n else [], top_vals[i].tolist() if n else [])
                for i, (c, r) in enumerate(zip(chosen.squeeze(1).tolist(), ranks))]

    def _prepare(self, sched: SchedulerOutput, kv: KVCacheManager):
        chunks, starts, tables = [], [], []
        logits_rows: list[int] = []
        sampling_reqs: list[Request] = []
        row = 0
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            chunks.append(req.token_ids[start:start + s.num_tokens])
            starts.append(start)
            tables.append(kv.block_ids(req.request_id))
            row += s.num_tokens
            if s.samples:
                logits_rows.append(row - 1)
                sampling_reqs.append(req)
        input_ids, positions, meta, rows = self._batch(chunks, starts, tables, logits_rows)
        return input_ids, positions, meta, rows, sampling_reqs

    def _batch(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
               logits_rows: list[int] | None = None):
        """input_ids, positions and attention metadata of one flattened batch: each
        sequence's new tokens (a chunk) from position ``start``, over its block table (and
        ``logits_rows`` as a device tensor, when given)."""
        ids: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        for chunk, start in zip(chunks, starts):
            ids.extend(chunk)
            query_start.append(query_start[-1] + len(chunk))
            seq_lens.append(start + len(chunk))
        max_blocks = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        qsl_t = torch.tensor(query_start, dtype=torch.int32)
        lens_t = torch.tensor(seq_lens, dtype=torch.int32)
        # positions: context_len .. seq_len-1 of each sequence, flattened
        query_lens = qsl_t[1:] - qsl_t[:-1]
        seq_idx = torch.repeat_interleave(torch.arange(len(seq_lens)), query_lens)
        positions = (torch.arange(len(ids)) - qsl_t[:-1][seq_idx] + (lens_t - query_lens)[seq_idx]).long()
        block_ids = table_t[seq_idx, positions // self.block_size].long()
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        input_ids = torch.tensor(ids, dtype=torch.long)
        rows = torch.tensor(logits_rows or [], dtype=torch.long)
        input_ids, positions, slot_mapping, rows = self._upload(
            input_ids, positions, slot_mapping, rows)
        qsl_d, lens_d, table_d = self._upload(qsl_t, lens_t, table_t)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=qsl_d, seq_lens=lens_d,
            block_tables=table_d, query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens,
            max_query_len=int(query_lens.max()), max_seq_len=max(seq_lens))
        if logits_rows is None:
            return input_ids, positions, meta
        return input_ids, positions, meta, rows

    def _upload(self, *host: torch.Tensor) -> list[torch.Tensor]:
        """Host tensors of one dtype onto the device as views of one buffer, one copy (see
        sampler.to_device). On CPU they are already there."""
        if self.device.type != "cuda":
            return list(host)
        dev = to_device(torch.cat([t.reshape(-1) for t in host]), self.device)
        out, at = [], 0
        for t in host:
            out.append(dev[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return out
