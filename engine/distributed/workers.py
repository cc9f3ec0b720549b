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
import time
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
        # shared with the watchdog thread, which must not keep this object alive (its
        # finalizer is what reaps the workers of an engine dropped without shutdown())
        self.state = _State()
        self._finalizer = weakref.finalize(self, _reap, list(self.procs), self.state)
        threading.Thread(target=_watchdog, args=(list(self.procs), self.state), daemon=True,
                         name="kvserve-tp-watchdog").start()
        torch.set_num_threads(_threads_per_rank(world))  # the cores, shared out between ranks
        self.tp = _group(self.store, 0, world)

    @property
    def died(self) -> str | None:
        return self.state.died

    def send(self, step) -> None:
        """Rank 0: hand the step to every worker (before running its own part)."""
        if self.died is not None:
            raise WorkerDiedError(self.died)
        try:
            self.tp.broadcast_object(step)
        except RuntimeError as e:
            raise self.failure(e) from e

    def failure(self, error: BaseException) -> WorkerDiedError:
        """A failed collective, named after the worker that died if one did (its socket
        can close a moment before its exit is visible: look for up to 2 s)."""
        deadline = time.monotonic() + 2.0
        while self.died is None and time.monotonic() < deadline:
            for p in self.procs:
                if p.exitcode is not None:
                    self.state.died = _exited(p)
            time.sleep(0.05)
        return WorkerDiedError(self.died or f"a tensor-parallel collective failed: {error}")

    def shutdown(self) -> None:
        if self.state.closed:
            return
        self.state.closed = True
        if self.died is None:
            try:
                self.tp.broadcast_object(None)
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=10)
        self._finalizer()  # kills whoever did not exit
        # the model's layers keep the TPGroup; dropping its process group (and our store)
        # closes the group's sockets and the store's port now
        self.tp.pg = None
        self.store = None


class _State:
    def __init__(self) -> None:
        self.died: str | None = None
        self.closed = False


def _exited(p) -> str:
    return f"tensor-parallel worker {p.name} exited (code {p.exitcode})"


def _watchdog(procs, state: _State) -> None:
    from multiprocessing.connection import wait

    sentinels = {p.sentinel: p for p in procs}
    while sentinels and not state.closed:
        for s in wait(list(sentinels), timeout=0.5):
            p = sentinels.pop(s)
            if not state.closed and state.died is None:
                p.join(timeout=1)
                state.died = _exited(p)
                logger.error("%s: the engine cannot step any more", state.died)


def die_with_parent(sig: int = 9) -> None:
    """Linux: this process gets ``sig`` (default SIGKILL) when its parent dies, however the
    parent dies (uvicorn re-raises SIGTERM after its shutdown, so a parent's `finally` may
    never run)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not glibc Linux: the closed sockets still end a worker


def _reap(procs, state: _State) -> None:
    state.closed = True
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

    die_with_parent()
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
