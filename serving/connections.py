"""The gateway's HTTP connections: uvicorn's httptools protocol with bounds on reading a request's head.

uvicorn times out only idle keep-alive connections, and only after a first response: a connection
that sends nothing, or trickles its request line and headers a byte at a time, stays open for as
long as the client likes, and the head it sends accumulates without a size bound. This protocol
gives every request head a deadline (``header_timeout_s``, from the connection's opening or from
the first byte of a later request) and a size (``max_header_bytes``):

- a head not complete in time: the connection is closed (408 first if part of a head had arrived;
  a connection that never sent a byte is just closed, as a server may close an idle one);
- a head over the size: 431 and the connection closed.

The body and what follows the head are the ASGI application's (``cdface.serving.middleware``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cdface.serving.http_errors import STATUS

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _error_bytes(code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the gateway's JSON form, closing the connection.

    It carries a fresh X-Request-ID like every response (``cdface.serving.request_ids``): the head that
    would hold the client's own never arrived whole."""
    status = STATUS[code]
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body), uuid.uuid4().hex.encode())) + body


class BoundedHeadProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose request heads must arrive within ``header_timeout_s`` and ``max_header_bytes``.

    The bounds are class attributes: ``bounded_protocol`` makes a subclass with them set, which is
    what uvicorn is given (it builds one protocol instance per connection).
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_pending = False  # waiting for (the rest of) a request head
        self._head_bytes = 0  # bytes received while a head was pending (at most one read more than the head)
        self._head_started = False  # some byte of the pending head has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head(started=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        pending_before = self._head_pending
        super().data_received(data)
        if not (pending_before and self._head_pending) or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_header_bytes:
            self._refuse("request_header_too_large",
                         f"the request line and headers are over the {self.max_header_bytes}-byte limit")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._head_pending:  # a later request on a kept-alive connection
            self._await_head(started=True)
        self._head_started = True

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._stop_head_timer()
        super().on_headers_complete()

    def _await_head(self, started: bool) -> None:
        self._head_pending, self._head_bytes, self._head_started = True, 0, started
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_pending or self.transport.is_closing():
            return
        if self._head_started:
            self._refuse("request_timeout", f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()

    def _refuse(self, code: str, message: str) -> None:
        self._head_pending = False
        self._stop_head_timer()
        self.logger.debug("closing a connection: %s", message)  # debug: a slow-loris client must not flood the log
        self.transport.write(_error_bytes(code, message))
        self.transport.close()


def bounded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class to give uvicorn (``http=``), with these bounds."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
