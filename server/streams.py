"""Helpers for consuming engine streams: merging several prompts, per-choice delta state."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class ChoiceState:
    """What was already sent for one choice (its text length and token count)."""
    sent_chars: int = 0
    sent_tokens: int = 0
    done: bool = False
    echoed: bool = False

    def advance(self, c) -> tuple[str, int]:
        delta = c.text[self.sent_chars:]
        new_tokens = len(c.token_ids) - self.sent_tokens
        self.sent_chars = len(c.text)
        self.sent_tokens = len(c.token_ids)
        return delta, new_tokens


async def merge(streams):
    """Yield (stream index, output) from several RequestStreams as they arrive.
    Leaving early (or being cancelled) closes every stream, aborting unfinished requests."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    # Bounded: a pump waits for the reader, and its stream coalesces outputs meanwhile.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, done))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()
