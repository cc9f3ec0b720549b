"""LoRA bookkeeping: plain Python, no torch.

``LoRARequest`` names an adapter (vLLM's shape). The engine identifies a loaded adapter by
a hash of its files' contents (its *key*), never by its name alone: a reloaded adapter with
new weights under the same name is another adapter, for the slots and the prefix cache.

``LoRASlots`` hands out the ``max_loras`` device slots that adapter weights live in. A
running request holds a reference on its slot; a slot with references is never given to
another adapter. A free slot keeps its adapter (a later request for it needs no load) until
the slot is reused, least recently released first; each reuse is a *load* the model runner
applies before the step runs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string.")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be a positive int (0 is the base "
                             f"model), got {self.lora_int_id!r}.")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be a path.")


class LoRASlots:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}.")
        self.keys: list[str | None] = [None] * max_loras
        self.refs = [0] * max_loras
        self._released = [0] * max_loras  # when each slot last dropped to 0 refs
        self._clock = itertools.count(1)
        self._loads: list[tuple[int, str]] = []

    def slot_of(self, key: str) -> int | None:
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    def acquire(self, key: str) -> int | None:
        """A slot holding ``key`` with one more reference, loading it into a free slot if
        needed; None when every slot is held by other adapters' running requests."""
        slot = self.slot_of(key)
        if slot is None:
            free = [s for s, refs in enumerate(self.refs) if refs == 0]
            if not free:
                return None
            # an empty slot first, else the one released longest ago
            slot = min(free, key=lambda s: (self.keys[s] is not None, self._released[s]))
            self.keys[slot] = key
            self._loads.append((slot, key))
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if self.refs[slot] <= 0:
            raise ValueError(f"LoRA slot {slot} released more often than acquired.")
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self._released[slot] = next(self._clock)

    def take_loads(self) -> list[tuple[int, str]]:
        """(slot, key) loads since the last call, oldest first, for the model runner."""
        loads, self._loads = self._loads, []
        return loads

    def forget(self, key: str) -> None:
        """An adapter unloaded for good: its free slot no longer counts as holding it."""
        slot = self.slot_of(key)
        if slot is not None and self.refs[slot] == 0:
            self.keys[slot] = None

    @property
    def in_use(self) -> int:
        return sum(1 for refs in self.refs if refs > 0)
