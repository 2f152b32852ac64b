"""uvicorn's httptools protocol, with a response's writes sent as one.

uvicorn writes a response in two ``transport.write`` calls, the status line and headers, then
the body: two ``send`` system calls and, on loopback, two segments for the client to wake up
for. Under load these two writes were 14% of the server's samples (py-spy, MLP at concurrency
32 on the 2-core benchmark machine). ``CoalescingTransport`` holds the writes made while the event
loop runs its ready callbacks and sends them, joined, once those are done: an ASGI app sends
``http.response.start`` and its ``http.response.body`` in one step unless the socket's buffer is
full, and when a batch completes, the responses of all its requests leave after they are all
encoded instead of each waking its client while the rest are still being written (on the 2-core
benchmark machine that contention costs more than the wait: MLP at concurrency 32, 6 interleaved
rounds, medians: off 2,440-2,700 req/s; sent at the end of the step 2,940-3,260; sent as soon as
the body joins the headers 2,650). Order is kept. uvicorn is handed the
protocol class through its documented ``http`` setting; ``BNFOLD_COALESCE_WRITES=0`` turns it
off.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# below this many bytes in all, held writes are joined into one buffer (a copy); above it they
# go to the socket together with writelines, which does not copy
_JOIN_BELOW = 64 << 10


class CoalescingTransport:
    """Forwards everything to ``transport``; writes of one event-loop step leave together."""

    __slots__ = ("_transport", "_loop", "_held", "_held_bytes")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        # a caller may reuse a mutable buffer once write() returns: keep a copy of those
        chunk = data if type(data) is bytes else bytes(data)
        self._held.append(chunk)
        self._held_bytes += len(chunk)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, []
        size, self._held_bytes = self._held_bytes, 0
        if not held or self._transport.is_closing():
            return
        if len(held) == 1:
            self._transport.write(held[0])
        elif size < _JOIN_BELOW:
            self._transport.write(b"".join(held))
        else:
            self._transport.writelines(held)

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self._transport.get_write_buffer_size()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, is_closing, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        super().connection_made(CoalescingTransport(transport, loop))  # type: ignore[arg-type]
