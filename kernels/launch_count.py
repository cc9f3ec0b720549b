"""Count the device kernels a piece of model code would launch, without a device.

On a GPU the profiler counts launches (bench/gpu_check.py does that on the device). On CPU
this instruments the launchers instead:

- every Triton kernel launch counts one (the interpreter's or the JIT's ``run``), and the
  torch ops the interpreter runs inside it count nothing;
- every aten op that computes counts one (what a CUDA kernel launch would be); views, empty
  allocations and metadata ops count nothing.

``scope`` names where a launch is counted, so a caller can attribute launches to layers
(``LaunchCounter.scoped`` puts a forward hook pair on modules).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate or re-describe memory without running a kernel
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
         "alias", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "set_", "resize_", "_reshape_alias", "record_stream"}


def _triton_runners():
    """(class, attribute) pairs whose ``run`` is one kernel launch in this Triton."""
    out = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction
        out.append(JITFunction)
    except ImportError:
        pass
    return out


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()  # (scope, op name) -> launches
        self.scope = "step"
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_triton:
            name = func.overloadpacket.__name__
            if not (func.is_view or name in _FREE):
                self.counts[(self.scope, name)] += 1
        return func(*args, **(kwargs or {}))

    def triton_launch(self, name: str):
        self.counts[(self.scope, "triton:" + name)] += 1

    def per_scope(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for (scope, _), n in self.counts.items():
            totals[scope] += n
        return totals

    def ops(self, scope: str) -> dict[str, int]:
        return {op: n for (s, op), n in sorted(self.counts.items()) if s == scope}

    @contextlib.contextmanager
    def scoped(self, modules: dict[str, torch.nn.Module]):
        """Count launches inside each module's forward under its name."""
        handles = []
        for name, module in modules.items():
            def enter(_m, _args, name=name):
                self._outer = self.scope
                self.scope = name

            def leave(_m, _args, _out):
                self.scope = self._outer
            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as c: ...``; then ``c.counts`` / ``c.per_scope()``."""
    counter = LaunchCounter()
    patched = []
    for cls in _triton_runners():
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if kwargs.get("warmup"):
                return _original(self, *args, **kwargs)
            counter.triton_launch(getattr(self, "__name__", None) or self.fn.__name__)
            counter._inside_triton += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter._inside_triton -= 1
        cls.run = run
        patched.append((cls, original))
    try:
        with counter:
            yield counter
    finally:
        for cls, original in patched:
            cls.run = original
