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

from .attention import AttentionMetadata, get_backend
from .config import EngineConfig
from .kv_cache_manager import KVCacheManager
from .loader import load_model
from .model_config import ModelConfig
from .request import Request
from .sampler import Sampler, SamplerOutput
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: str) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.model = load_model(model_dir, model_config, self.dtype, self.device)
        self.backend = get_backend(config.backend_name, model_config.head_dim,
                                   model_config.sliding_window)
        self.sampler = Sampler(model_config.vocab_size)
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model_config
        per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * self.dtype.itemsize
        return per_token * self.block_size * cfg.num_hidden_layers

    def allocate_kv_cache(self) -> int:
        """Preallocate the pool: one [2, num_blocks, block_size, kv_heads, head_dim] per layer."""
        self.num_blocks = self.config.num_kv_blocks or self._blocks_from_budget()
        cfg = self.model_config
        shape = (2, self.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(cfg.num_hidden_layers)]
        self.model.init_rotary(self._max_positions(), self.device)
        return self.num_blocks

    def _blocks_from_budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.gpu_memory_utilization)
        else:
            budget = self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block "
                             f"({self.bytes_per_block} bytes each).")
        return num_blocks

    def _max_positions(self) -> int:
        return max(self.config.max_model_len or 0, self.model_config.max_position_embeddings) + 1

    def add_generator(self, req: Request) -> None:
        if req.sampling_params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.sampling_params.seed + req.index)
            self.generators[req.request_id] = gen

    def drop_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, kv: KVCacheManager
                ) -> tuple[list[Request], SamplerOutput | None]:
        input_ids, positions, meta, logits_rows, sampling_reqs = self._prepare(sched, kv)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not sampling_reqs:
            return [], None
        logits = self.model.compute_logits(hidden[logits_rows])
        return sampling_reqs, self.sampler(logits, sampling_reqs, self.generators)

    def _prepare(self, sched: SchedulerOutput, kv: KVCacheManager):
        ids: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sampling_reqs: list[Request] = []
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            ids.extend(req.token_ids[start:start + s.num_tokens])
            query_start.append(query_start[-1] + s.num_tokens)
            seq_lens.append(start + s.num_tokens)
            tables.append(kv.block_ids(req.request_id))
            if s.samples:
                logits_rows.append(query_start[-1] - 1)
                sampling_reqs.append(req)
        dev = self.device
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
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev),
            query_start_loc=qsl_t.to(dev),
            seq_lens=lens_t.to(dev),
            block_tables=table_t.to(dev),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            max_query_len=int(query_lens.max()),
            max_seq_len=max(seq_lens),
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev)
        rows = torch.tensor(logits_rows, dtype=torch.long).to(dev)
        return input_ids, positions.to(dev), meta, rows, sampling_reqs
