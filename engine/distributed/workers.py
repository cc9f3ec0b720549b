"""The worker processes of one tensor-parallel engine (ranks 1..N-1), started with spawn.

Rank 0 (the engine's own process) creates a TCPStore on a port the OS picks (port 0: no
guessing, no clash between engines), the workers join it, and all ranks build one gloo
group from it. Each worker then builds its ModelRunner shard and loops: receive a step,
run its part of the forward pass (the collectives pair it with rank 0's), repeat; None
stops it. A watchdog thread notices a worker that died: its sockets close, so rank 0's
pending collective fails at once with gloo's "connection closed" and the engine raises
instead of hanging; shutdown() joins (then kills) every worker, and a finalizer does the
same if the engine is garbage-collected without it.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import threading
import weakref

from ..core.faults import EngineFatalError

logger = logging.getLogger(__name__)

# A worker waits for the next step as long as the server idles: no timeout on that wait.
# Dead peers are noticed through their closed sockets, not through this.
_GROUP_TIMEOUT = datetime.timedelta(days=7)
_JOIN_TIMEOUT = datetime.timedelta(seconds=120)


class WorkerDiedError(EngineFatalError):
    """A tensor-parallel worker process exited; the engine cannot step any more."""


def _threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _group(store, rank: int, world: int):
    import torch.distributed as dist

    from .tp import TPGroup

    return TPGroup(rank, world, dist.ProcessGroupGloo(store, rank, world, _GROUP_TIMEOUT))


class Workers:
    def __init__(self, config, model_dir: str) -> None:
        import torch
        import torch.distributed as dist

        world = config.tensor_parallel_size
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                   wait_for_workers=False, timeout=_JOIN_TIMEOUT)
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, daemon=True,
                                  name=f"kvserve-tp-rank{rank}",
                                  args=(rank, world, self.store.port, config, model_dir))
                      for rank in range(1, world)]
        for p in self.procs:
            p.start()
        self.died: str | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _reap, list(self.procs))
        self._watch = threading.Thread(target=self._watchdog, daemon=True,
                                       name="kvserve-tp-watchdog")
        self._watch.start()
        torch.set_num_threads(_threads_per_rank(world))  # the cores, shared out between ranks
        self.tp = _group(self.store, 0, world)

    def _watchdog(self) -> None:
        sentinels = {p.sentinel: p for p in self.procs}
        from multiprocessing.connection import wait

        while sentinels and not self._closed:
            for s in wait(list(sentinels), timeout=0.5):
                p = sentinels.pop(s)
                if not self._closed:
                    self.died = f"tensor-parallel worker {p.name} exited (code {p.exitcode})"
                    logger.error("%s: the engine cannot step any more", self.died)

    def send(self, step) -> None:
        """Rank 0: hand the step to every worker (before running its own part)."""
        if self.died is not None:
            raise WorkerDiedError(self.died)
        try:
            self.tp.broadcast_object(step)
        except RuntimeError as e:
            raise WorkerDiedError(self.died or f"a tensor-parallel worker is gone: {e}") from e

    def check(self, error: BaseException) -> BaseException:
        """A collective's failure as the clearer error when a worker died."""
        return WorkerDiedError(self.died) if self.died is not None else error

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.died is None:
            try:
                self.tp.broadcast_object(None)
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=10)
        self._finalizer()  # kills whoever did not exit
        self.tp = None  # the group's sockets close with it
        self.store = None


def _reap(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=5)


def worker_main(rank: int, world: int, port: int, config, model_dir: str) -> None:
    """A worker process: join the group, build this rank's shard, run steps until None."""
    import torch
    import torch.distributed as dist

    from ..model_executor.model_config import ModelConfig
    from ..model_executor.model_runner import ModelRunner

    torch.set_num_threads(_threads_per_rank(world))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=_JOIN_TIMEOUT)
    tp = _group(store, rank, world)
    torch.manual_seed(config.seed)
    runner = ModelRunner(config, ModelConfig.from_pretrained(model_dir), model_dir, tp=tp)
    runner.allocate_kv_cache()
    while True:
        try:
            step = tp.broadcast_object()
        except RuntimeError:  # rank 0 went away: nothing left to serve
            return
        if step is None:
            return
        runner.forward_step(step)
