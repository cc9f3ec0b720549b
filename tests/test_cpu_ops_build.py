"""Where the C++ CPU ops build: one folder per version of the sources and torch install, and a
lock left by a build that was killed does not make every later start wait forever."""
from __future__ import annotations

import os
import time

from kernels import cpu_ops


def test_build_folder_is_keyed_and_a_stale_lock_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cpu_ops._build_dir()
    assert os.path.dirname(path) == str(tmp_path / "kvserve_cpu_ops")
    assert cpu_ops._build_dir() == path  # same sources, same folder
    lock = os.path.join(path, "lock")
    open(lock, "w").close()  # a build running now: left alone
    cpu_ops._build_dir()
    assert os.path.exists(lock)
    old = time.time() - cpu_ops.STALE_LOCK_SECONDS - 60  # a build killed long ago
    os.utime(lock, (old, old))
    cpu_ops._build_dir()
    assert not os.path.exists(lock)
    monkeypatch.setattr(cpu_ops, "_CFLAGS", cpu_ops._CFLAGS + ["-DKVSERVE_OTHER"])
    assert cpu_ops._build_dir() != path  # other flags (or sources, or torch): another build
