"""HTTP request plumbing shared by the OpenAI and KServe v2 routes: a bounded, timed body
read, and running a handler only while its client stays connected."""
from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

from . import protocol as P


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, or a 413 past ``limit`` bytes / a 408 past ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise P.APIError(413, f"request body over {limit} bytes", code="request_too_large")
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise P.APIError(413, f"request body over {limit} bytes",
                                     code="request_too_large")
    except TimeoutError as e:
        raise P.APIError(408, f"request body not received within {timeout}s",
                         code="request_timeout") from e
    return bytes(data)


async def until_disconnect(request: Request, coro):
    """Run coro; if the client hangs up first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise P.APIError(499, "client closed the request", code="client_closed")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
