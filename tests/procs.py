"""Processes as /proc sees them, for the tests that check nothing is left behind."""
from __future__ import annotations

import os


def _stat(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(parent: int, needle: bytes | None = None) -> list[int]:
    """Live children of ``parent`` (whatever started them), except multiprocessing's resource
    tracker (one per process, shared, gone with its parent); with ``needle``, only those
    whose command line holds it."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = _stat(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (fields and int(fields[1]) == parent and fields[0] != "Z"
                and b"resource_tracker" not in cmdline and (needle is None or needle in cmdline)):
            out.append(int(pid))
    return out


def alive(pid: int) -> bool:
    fields = _stat(str(pid))
    return fields is not None and fields[0] != "Z"


def descendants_of(parent: int) -> list[int]:
    """Live children of ``parent``, their children, and so on."""
    out, todo = [], [parent]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out
