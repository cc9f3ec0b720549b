"""A header-read timeout for uvicorn's h11 protocol (slowloris protection).

uvicorn has no limit on how long a client may take to send its request headers:
`timeout_keep_alive` only covers the idle gap *between* requests. A client that
connects and sends nothing, or trickles header bytes, holds a connection and a file
descriptor forever. `HeaderTimeoutH11Protocol` gives each request `header_timeout`
seconds, counted from the moment the connection opens (first request) or from the
first byte of the next request (keep-alive), to deliver complete headers; otherwise
the server answers 408 and closes the connection.

Once the headers are in, the timer is off: request bodies, slow handlers and long
streamed responses are not limited here.

Usage:
    uvicorn.run(app, http=protocol_with_header_timeout(30.0), ...)
or, from the uvicorn command line, with the default timeout:
    --http server.http_timeouts:HeaderTimeoutH11Protocol
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 30.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving complete request headers."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    # uvicorn builds one protocol instance per connection, so per-connection state
    # lives on the instance.
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A new connection owes us its first request's headers right away.
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        # h11 reports the client as IDLE until a whole request head has been parsed.
        # Bytes arriving in that state start a request, so start its clock. Without
        # a running timer this is the first byte after a keep-alive gap (uvicorn's own
        # keep-alive timer covered the gap and is cancelled by super().data_received).
        # Bytes arriving in any other state (a body, or pipelined data, which h11 buffers
        # until the current response is done) are not header bytes of a new request.
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        super().data_received(data)
        # Leaving IDLE means h11 produced a Request (or hit a protocol error, which
        # uvicorn answers with 400 and a close): the headers are done either way.
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        # Re-check: the timer is cancelled whenever headers complete, but this is cheap
        # insurance against ever cutting off a request that is already being served.
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # debug, not warning: under a slowloris attack this fires once per connection.
        self.logger.debug("Request headers not received within %ss; closing connection.", self.header_timeout)
        self._send_408()
        self.transport.close()

    def _send_408(self) -> None:
        # h11 lets a server send a response while the client is still IDLE (no request
        # parsed yet), which is exactly this situation. If our side is not IDLE
        # (something else is already being sent) we cannot answer; just close.
        if self.conn.our_state is not h11.IDLE:
            return
        body = b"Request Timeout"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                output = self.conn.send(event)
                if output:
                    self.transport.write(output)
        except h11.LocalProtocolError:  # pragma: no cover - defensive; the close follows anyway
            pass


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """Return a HeaderTimeoutH11Protocol subclass with `header_timeout` bound to `seconds`.

    uvicorn instantiates the `http=` class itself with a fixed signature, so the
    timeout is bound on a class rather than passed to the constructor.
    """
    seconds = float(seconds)
    if not seconds > 0:  # also rejects NaN
        raise ValueError(f"header timeout must be > 0 seconds, got {seconds!r}")
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds})
