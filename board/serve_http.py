"""uvicorn's HTTP/1.1 protocol (h11) with the three things board/serve.py needs and uvicorn lacks.

uvicorn owns the connections: backlog, keep-alive timeout, IPv6, graceful shutdown, streaming. Its
h11 protocol, though, (1) waits forever for a request head that never completes (a "slowloris"
client holds a connection for as long as it likes), (2) closes the connection when the client
half-closes it (shutdown(SHUT_WR) after sending its request: legal HTTP, and the client never gets
its answer), and (3) answers a malformed request with a text/plain 400. This subclass:

1. Gives every request head `head_timeout_s` from the moment the connection opens (or the previous
   answer ends): past it, a client that sent part of a head gets a 408 in the OpenAI error shape and
   the connection closes (a silent idle one just closes).
2. Keeps a half-closed connection open for the answer. A client that closed its end before its
   request body was complete gets what it sent marked as cut (`BODY_CUT` in the ASGI scope: the app
   answers 400 at once). A half-close cannot be told from a client that went away (both send FIN)
   until the server writes: while the answer is not started, an interim `100 Continue` (which every
   HTTP/1.1 client must skip) is written now, after 0.1 s and then every second; a client that is
   gone answers it with a reset, the next write fails, and uvicorn reports the disconnect, so the
   app cancels the request.
3. Sends its 400 for an unparseable request as JSON.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_schemas import error_body

BODY_CUT = "smolvlm.body_cut"  # scope key: the client closed its end before the body was complete
_PROBE_DELAYS = (0.1, 1.0)  # after the first probe; then every _PROBE_DELAYS[-1] seconds


def error_bytes(status: int, reason: str, message: str, code: str, *, type: str = "invalid_request_error") -> bytes:
    """A complete HTTP/1.1 error response (OpenAI's shape), closing the connection."""
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


class Protocol(H11Protocol):
    """See the module docstring; `head_timeout_s` is set by the server (a class attribute per server)."""

    head_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None
        self._probe_timer: Any = None
        self._probes = 0
        self._peer_closed = False

    # -- 1. the request head's deadline -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the head arrived (its body has its own timeout, in the app)
        if self.cycle is not None and not self.cycle.response_complete:
            return
        partial, _ = self.conn.trailing_data
        if partial:
            self.transport.write(error_bytes(408, "Request Timeout", f"the request head did not arrive within "
                                             f"{self.head_timeout_s:g} s", "request_timeout"))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._peer_closed:
            self.transport.close()  # nothing more can come from this client
        elif not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for timer in (self._head_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    # -- 2. half-closed clients ----------------------------------------------------------------

    def eof_received(self) -> Optional[bool]:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None  # no request in progress: close, as uvicorn does
        self._peer_closed = True
        if self.conn.their_state is h11.SEND_BODY:  # the body ended before its end: what came is all
            cycle.scope[BODY_CUT] = True  # type: ignore[literal-required]
            cycle.more_body = False
            cycle.message_event.set()
        self._probe()
        return True  # keep our side open for the answer

    def _probe(self) -> None:
        self._probe_timer = None
        cycle = self.cycle
        if (self.transport.is_closing() or cycle is None or cycle.response_started or cycle.disconnected):
            return  # once the answer has started, its own writes find out whether the client is there
        try:
            self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                          reason=b"Continue")))
        except h11.LocalProtocolError:
            return
        delay = _PROBE_DELAYS[min(self._probes, len(_PROBE_DELAYS) - 1)]
        self._probes += 1
        self._probe_timer = self.loop.call_later(delay, self._probe)

    # -- 3. JSON for h11's parse errors ------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self.transport.write(error_bytes(400, "Bad Request", "the request is not valid HTTP/1.1",
                                         "invalid_http_request"))
        self.transport.close()
