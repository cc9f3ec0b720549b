"""Header-read timeout (server/http_timeouts.py) against a real uvicorn server, raw sockets."""
from __future__ import annotations

import asyncio
import select
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from server.http_timeouts import (
    DEFAULT_HEADER_TIMEOUT,
    HeaderTimeoutH11Protocol,
    protocol_with_header_timeout,
)

HEADER_TIMEOUT = 0.5
CUTOFF_BOUND = 3.0  # generous upper bound for "the server closed us because of the timeout"
STREAM_CHUNKS = 4
STREAM_GAP = 0.3  # 4 chunks, 0.3 s apart: ~1.2 s, well over HEADER_TIMEOUT


async def fast(request):
    return PlainTextResponse("ok")


async def slow(request):
    await asyncio.sleep(1.5)
    return PlainTextResponse("slow done")


async def stream(request):
    async def chunks():
        for i in range(STREAM_CHUNKS):
            yield f"chunk{i}\n".encode()
            await asyncio.sleep(STREAM_GAP)

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(request):
    return PlainTextResponse((await request.body()).decode())


APP = Starlette(routes=[Route("/fast", fast), Route("/slow", slow), Route("/stream", stream),
                        Route("/echo", echo, methods=["POST"])])


@pytest.fixture(scope="module")
def server_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free port, no race
    port = sock.getsockname()[1]
    config = uvicorn.Config(APP, http=protocol_with_header_timeout(HEADER_TIMEOUT), lifespan="off",
                            log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    assert issubclass(config.http_protocol_class, HeaderTimeoutH11Protocol)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn thread did not stop"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(f) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (content-length or chunked) from a socket file."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()  # CRLF after each chunk
        f.readline()  # CRLF after the last (empty) chunk; no trailers
    else:
        body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def trickle_until_cut_off(sock: socket.socket, payload: bytes, gap: float = 0.2):
    """Send payload one byte per `gap` s; stop when the server answers or closes.

    Returns (bytes sent, seconds taken, whatever the server sent before closing)."""
    start = time.monotonic()
    for sent, byte in enumerate(payload):
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic() - start, b""
        readable, _, _ = select.select([sock], [], [], gap)
        if readable:
            return sent + 1, time.monotonic() - start, read_until_closed(sock)
    return len(payload), time.monotonic() - start, b""


def assert_408_or_nothing(data: bytes) -> None:
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data


# --- connections that never complete their headers are cut off ------------------------------

def test_silent_connection_is_closed(server_port):
    start = time.monotonic()
    with connect(server_port) as sock:
        data = read_until_closed(sock)
    elapsed = time.monotonic() - start
    # Lower bound: it was the timeout that closed us, not something immediate.
    assert HEADER_TIMEOUT - 0.1 <= elapsed < CUTOFF_BOUND
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert data.endswith(b"Request Timeout")


def test_slowloris_is_cut_off(server_port):
    # ~70 bytes at 0.2 s each would take ~14 s. Bytes keep arriving, so only a deadline on
    # the whole header (not an idle timeout) can stop this client.
    payload = b"GET /fast HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
    with connect(server_port) as sock:
        sent, elapsed, data = trickle_until_cut_off(sock, payload)
    assert sent < len(payload)
    assert HEADER_TIMEOUT - 0.1 <= elapsed < CUTOFF_BOUND
    assert_408_or_nothing(data)


def test_slowloris_on_keep_alive_connection_is_cut_off(server_port):
    # The clock restarts at the first byte of the second request.
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(get("/fast"))
        assert read_response(f)[0] == 200
        time.sleep(0.3)
        sent, elapsed, data = trickle_until_cut_off(sock, get("/fast") + b"X" * 40)
    assert sent < len(get("/fast"))
    assert elapsed < CUTOFF_BOUND
    assert_408_or_nothing(data)


# --- requests whose headers are complete are never cut off ----------------------------------

def test_fast_request(server_port):
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(get("/fast"))
        status, _, body = read_response(f)
    assert (status, body) == (200, b"ok")


def test_slow_handler_completes(server_port):
    start = time.monotonic()
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(get("/slow"))
        status, _, body = read_response(f)
    assert (status, body) == (200, b"slow done")
    assert time.monotonic() - start >= 1.4  # the handler really outlived the header timeout


def test_long_streamed_response_completes(server_port):
    start = time.monotonic()
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(get("/stream"))
        status, headers, body = read_response(f)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"".join(f"chunk{i}\n".encode() for i in range(STREAM_CHUNKS))
    assert time.monotonic() - start > 2 * HEADER_TIMEOUT


def test_slow_request_body_is_not_limited(server_port):
    # The timeout covers headers only; the body may take longer.
    body = b"hello body"
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(2 * HEADER_TIMEOUT)
        sock.sendall(body)
        status, _, got = read_response(f)
    assert (status, got) == (200, body)


@pytest.mark.parametrize("pause", [0.2, 2 * HEADER_TIMEOUT])
def test_keep_alive_requests(server_port, pause):
    # The second pause is longer than the header timeout: the gap between requests is
    # uvicorn's keep-alive timeout's business (5 s here), not ours.
    with connect(server_port) as sock, sock.makefile("rb") as f:
        sock.sendall(get("/fast"))
        assert read_response(f)[::2] == (200, b"ok")
        time.sleep(pause)
        sock.sendall(get("/fast"))
        assert read_response(f)[::2] == (200, b"ok")


# --- the factory -----------------------------------------------------------------------------

def test_factory_binds_timeout():
    cls = protocol_with_header_timeout(2)
    assert issubclass(cls, HeaderTimeoutH11Protocol) and cls is not HeaderTimeoutH11Protocol
    assert cls.header_timeout == 2.0
    assert HeaderTimeoutH11Protocol.header_timeout == DEFAULT_HEADER_TIMEOUT
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            protocol_with_header_timeout(bad)
