"""What rank 0 tells the other ranks each step, and how they keep block tables in sync.

A step names its sequences with this step's tokens and first position only; block tables
travel as differences (a request's whole table the first time a rank sees it, or after a
preemption gave it other blocks; then only appended block ids), so a decode step of many
long sequences costs a few bytes per sequence, not its context length. Plain Python."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInput:
    # (request id, this step's token ids, position of the first of them)
    seqs: list[tuple[str, list[int], int]]
    logit_rows: list[int]  # flattened-batch rows whose logits rank 0 needs
    new_tables: dict[str, list[int]] = field(default_factory=dict)
    appended: dict[str, list[int]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    # multi-LoRA: the step's runs of one adapter slot, (start row, end row, slot), None
    # without adapter tokens; and the adapters rank 0 wrote into slots since the last step,
    # (slot, LoRAAdapter) with the whole CPU weights: each rank cuts its own part
    lora_runs: list[tuple[int, int, int]] | None = None
    lora_loads: list = field(default_factory=list)


class TableSender:
    """Rank 0: which blocks the other ranks know for each request."""

    def __init__(self) -> None:
        self.sent: dict[str, list[int]] = {}
        self.dropped: list[str] = []

    def drop(self, request_id: str) -> None:
        if self.sent.pop(request_id, None) is not None:
            self.dropped.append(request_id)

    def encode(self, seqs: list[tuple[str, list[int], int]], tables: list[list[int]],
               logit_rows: list[int]) -> StepInput:
        step = StepInput(seqs, logit_rows, dropped=self.dropped)
        self.dropped = []
        for (rid, _, _), table in zip(seqs, tables):
            known = self.sent.get(rid)
            if known is None or table[:len(known)] != known:
                step.new_tables[rid] = list(table)
            elif len(table) > len(known):
                step.appended[rid] = table[len(known):]
            self.sent[rid] = list(table)
        return step


class TableMirror:
    """Every rank: the block tables as rank 0 sent them."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def apply(self, step: StepInput) -> list[list[int]]:
        """Apply the step's differences; this step's tables in sequence order."""
        for rid in step.dropped:
            self.tables.pop(rid, None)
        self.tables.update(step.new_tables)
        for rid, blocks in step.appended.items():
            self.tables[rid].extend(blocks)
        return [self.tables[rid] for rid, _, _ in step.seqs]
