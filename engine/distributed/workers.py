"""The workers of one tensor-parallel engine (ranks 1..N-1): spawned processes ("mp") or
Ray actors in a placement group ("ray").

Rank 0 (the engine's own process) creates a TCPStore on a port the OS picks (port 0: no
guessing, no clash between engines), the workers join it, and all ranks build one gloo
group from it. Each worker then builds its ModelRunner shard and loops: receive a step,
run its part of the forward pass (the collectives pair it with rank 0's), repeat; None
stops it. A watchdog thread notices a worker that died: its sockets close, so rank 0's
pending collective fails at once with gloo's "connection closed" and the engine raises
instead of hanging; shutdown() stops every worker, and a finalizer does the same if the
engine is garbage-collected without it.
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
    """A tensor-parallel worker exited; the engine cannot step any more."""


def _threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _group(store, rank: int, world: int, own_host: str, device_type: str = "cpu"):
    """The ranks' groups: gloo for the step inputs and small CPU values, its sockets on
    ``own_host`` (this rank's address as the others reach it), or on GLOO_SOCKET_IFNAME's
    interface when that is set (gloo's own default, the address the hostname resolves to,
    is 127.0.1.1 on many Linux hosts: fine on one node, unreachable from the next). On CUDA
    the activations' all-reduces and the logits gather go over a second group, NCCL,
    between the ranks' devices; KVSERVE_TP_DEVICE_GROUP=gloo builds that second group on
    CPU too (tests: the two-group wiring without a GPU)."""
    import torch.distributed as dist

    from .tp import TPGroup

    gloo = dist.ProcessGroupGloo

    def gloo_group(prefix_store):
        options = gloo._Options()
        options._timeout = _GROUP_TIMEOUT
        options._devices = [gloo.create_default_device()
                            if os.environ.get("GLOO_SOCKET_IFNAME")
                            else gloo.create_device(hostname=own_host)]
        return gloo(prefix_store, rank, world, options)

    device_pg = None
    if device_type == "cuda":
        device_pg = dist.ProcessGroupNCCL(dist.PrefixStore("device", store), rank, world)
    elif os.environ.get("KVSERVE_TP_DEVICE_GROUP") == "gloo":
        device_pg = gloo_group(dist.PrefixStore("device", store))
    return TPGroup(rank, world, gloo_group(dist.PrefixStore("cpu", store)), device_pg)


class _State:
    """Shared with the watchdog thread and the finalizer, which must not keep the Workers
    object alive (its finalizer is what stops the workers of an engine dropped without
    shutdown())."""

    def __init__(self) -> None:
        self.died: str | None = None
        self.closed = False


def start_workers(config, model_dir: str) -> "Workers":
    return (RayWorkers if config.distributed_executor_backend == "ray" else MPWorkers)(
        config, model_dir)


class Workers:
    host = "127.0.0.1"

    def __init__(self, config, model_dir: str) -> None:
        import torch
        import torch.distributed as dist

        world = config.tensor_parallel_size
        self.store = dist.TCPStore(self.host, 0, world, is_master=True,
                                   wait_for_workers=False, timeout=_JOIN_TIMEOUT)
        self.state = _State()
        self._launch(config, model_dir, world)
        torch.set_num_threads(_threads_per_rank(world))  # the cores, shared out between ranks
        self.tp = _group(self.store, 0, world, self.host, config.torch_device.type)

    # what a backend provides
    def _launch(self, config, model_dir: str, world: int) -> None:
        raise NotImplementedError

    def _find_dead(self) -> str | None:
        """Which worker has exited, if one has (without waiting)."""
        raise NotImplementedError

    def _wait(self) -> None:
        """After the stop step: give the workers up to 10 s to exit on their own."""
        raise NotImplementedError

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
            self.state.died = self._find_dead()
            time.sleep(0.05)
        return WorkerDiedError(self.died or f"a tensor-parallel forward pass failed: {error!r}")

    def shutdown(self) -> None:
        if self.state.closed:
            return
        if self.died is None:
            try:
                self.tp.broadcast_object(None)
            except RuntimeError:
                pass
        self.state.closed = True
        self._wait()
        self._finalizer()  # stops whoever did not exit
        # the model's layers keep the TPGroup; dropping its process group (and our store)
        # closes the group's sockets and the store's port now
        self.tp.pg = self.tp.device_pg = None
        self.store = None


# ---- spawned processes --------------------------------------------------------------------
class MPWorkers(Workers):
    def _launch(self, config, model_dir: str, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, daemon=True,
                                  name=f"kvserve-tp-rank{rank}",
                                  args=(rank, world, self.host, self.store.port, config,
                                        model_dir))
                      for rank in range(1, world)]
        for p in self.procs:
            p.start()
        self._finalizer = weakref.finalize(self, _reap, list(self.procs), self.state)
        threading.Thread(target=_watchdog, args=(list(self.procs), self.state), daemon=True,
                         name="kvserve-tp-watchdog").start()

    def _find_dead(self) -> str | None:
        return next((_exited(p) for p in self.procs if p.exitcode is not None), None)

    def _wait(self) -> None:
        for p in self.procs:
            p.join(timeout=10)


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


def _reap(procs, state: _State) -> None:
    state.closed = True
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=5)


# ---- Ray actors ---------------------------------------------------------------------------
class RayWorkers(Workers):
    """Ranks 1..N-1 as Ray actors of one CPU each, in a placement group: STRICT_PACK when
    rank 0's node can hold them, else PACK across nodes (each rank's gloo sockets on its
    node's address). Uses the Ray cluster this process is connected to (``ray.init``
    first), or starts a local one."""

    def __init__(self, config, model_dir: str) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        self.host = ray.util.get_node_ip_address()  # rank 0's address, for the others
        super().__init__(config, model_dir)

    def _launch(self, config, model_dir: str, world: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = placement_strategy(ray.nodes(), self.host, world - 1)
        gpus = 1 if config.torch_device.type == "cuda" else 0
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self.group = placement_group([bundle] * (world - 1), strategy=strategy)
        ray.get(self.group.ready(), timeout=60)
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(_RayRank)
        self.actors = [actor.options(
            name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=i)).remote() for i in range(world - 1)]
        self.runs = [a.run.remote(rank, world, self.host, self.store.port, config, model_dir)
                     for rank, a in enumerate(self.actors, start=1)]
        self._finalizer = weakref.finalize(self, _reap_ray, list(self.actors), self.group,
                                           self.state)
        threading.Thread(target=_ray_watchdog, args=(list(self.runs), self.state), daemon=True,
                         name="kvserve-tp-watchdog").start()

    def _find_dead(self) -> str | None:
        import ray

        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return f"tensor-parallel Ray actor of rank {self.runs.index(done[0]) + 1} exited" \
            if done else None

    def _wait(self) -> None:
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=10)


def placement_strategy(nodes: list[dict], host: str, bundles: int) -> str:
    """STRICT_PACK (every worker on one node, the fastest all-reduce) when rank 0's node
    has the CPUs for them all, else PACK: as few nodes as the cluster allows."""
    here = [n for n in nodes if n.get("Alive") and n.get("NodeManagerAddress") == host]
    cpus = here[0].get("Resources", {}).get("CPU", 0) if here else 0
    return "STRICT_PACK" if cpus >= bundles else "PACK"


class _RayRank:
    def run(self, rank: int, world: int, host: str, port: int, config, model_dir: str) -> None:
        import ray

        worker_main(rank, world, host, port, config, model_dir, tie_to_parent=False,
                    own_host=ray.util.get_node_ip_address(),
                    device_index=0)  # Ray shows each actor only the GPU it was given


def _ray_watchdog(runs, state: _State) -> None:
    import ray

    pending = list(runs)
    while pending and not state.closed:
        done, pending = ray.wait(pending, timeout=0.5)
        if done and not state.closed and state.died is None:
            state.died = f"tensor-parallel Ray actor of rank {runs.index(done[0]) + 1} exited"
            logger.error("%s: the engine cannot step any more", state.died)


def _reap_ray(actors, group, state: _State) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    state.closed = True
    if not ray.is_initialized():
        return
    for a in actors:
        ray.kill(a)
    remove_placement_group(group)


# ---- a worker -------------------------------------------------------------------------------
def die_with_parent(sig: int = 9) -> None:
    """Linux: this process gets ``sig`` (default SIGKILL) when its parent dies, however the
    parent dies (uvicorn re-raises SIGTERM after its shutdown, so a parent's `finally` may
    never run)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not glibc Linux: the closed sockets still end a worker


def worker_main(rank: int, world: int, host: str, port: int, config, model_dir: str,
                tie_to_parent: bool = True, own_host: str | None = None,
                device_index: int | None = None) -> None:
    """A worker: join the group (rank 0's store at host:port; this rank's sockets on
    ``own_host``, default ``host``: the same node), build this rank's shard (on CUDA, on
    device ``device_index``, default its rank), run steps until None."""
    import torch
    import torch.distributed as dist

    from ..model_executor.model_config import ModelConfig
    from ..model_executor.model_runner import ModelRunner

    if tie_to_parent:
        die_with_parent()
    device_type = config.torch_device.type
    if device_type == "cuda":  # "cuda" below means this rank's device
        torch.cuda.set_device(rank if device_index is None else device_index)
    torch.set_num_threads(_threads_per_rank(world))
    store = dist.TCPStore(host, port, world, is_master=False, timeout=_JOIN_TIMEOUT)
    tp = _group(store, rank, world, own_host or host, device_type)
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
