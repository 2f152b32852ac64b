"""service/http_protocol.py: writes held for one round of the event loop, then sent together,
in order, over real sockets; and the real server on it keeps HTTP/1.1 semantics."""

from __future__ import annotations

import asyncio
import socket

from service.http_protocol import CoalescingTransport


async def _pair():
    """A real asyncio transport on one end of a socket pair, the other end for reading."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    sent: list[bytes] = []
    real_write = transport.write

    def write(data):  # record what reaches the socket, as it is handed over
        sent.append(bytes(data))
        real_write(data)

    transport.write = write
    theirs.setblocking(False)
    return CoalescingTransport(transport, loop), transport, theirs, sent


async def _read(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_writes_of_one_round_leave_as_one_write_in_order():
    async def main():
        coalescing, _, theirs, sent = await _pair()
        buffer = bytearray(b"body")
        coalescing.write(b"HTTP/1.1 200 OK\r\n\r\n")
        coalescing.write(buffer)
        buffer[:] = b"XXXX"  # the caller reuses its buffer: what was written must not change
        assert sent == [] and coalescing.get_write_buffer_size() == 23
        await asyncio.sleep(0)  # one round of the loop
        assert sent == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        coalescing.write(b"next")
        await asyncio.sleep(0)
        assert sent[1:] == [b"next"]
        assert await _read(theirs, 27) == b"HTTP/1.1 200 OK\r\n\r\nbodynext"
        coalescing.close()
        theirs.close()

    asyncio.run(main())


def test_close_sends_what_is_held_first_and_abort_drops_it():
    async def main():
        coalescing, _, theirs, sent = await _pair()
        coalescing.write(b"last words")
        coalescing.close()
        assert sent == [b"last words"]
        assert await _read(theirs, 100) == b"last words"  # then end of stream
        theirs.close()

        coalescing, transport, theirs, sent = await _pair()
        coalescing.write(b"never")
        coalescing.abort()
        await asyncio.sleep(0)
        assert sent == [] and transport.is_closing()
        theirs.close()

    asyncio.run(main())


def test_large_responses_are_not_copied_into_one_buffer_and_arrive_whole():
    async def main():
        coalescing, transport, theirs, _ = await _pair()
        chunks = [b"h" * 100, bytes(range(256)) * 1024]  # 256 kB body
        lines: list[list[bytes]] = []
        real_writelines = transport.writelines
        transport.writelines = lambda held: (lines.append(list(held)), real_writelines(held))
        for chunk in chunks:
            coalescing.write(chunk)
        await asyncio.sleep(0)
        assert lines == [chunks]  # handed over together, not joined here (uvloop: one writev)
        assert await _read(theirs, sum(map(len, chunks))) == b"".join(chunks)
        assert coalescing.get_extra_info("socket") is transport.get_extra_info("socket")
        coalescing.close()
        theirs.close()

    asyncio.run(main())


def _exchange(server, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_server_answers_pipelined_requests_in_order_and_honours_connection_close(server):
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    meta = b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = _exchange(server, ready + meta)  # the server closes after the second answer
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
    assert rest.count(b"HTTP/1.1 200") == 1 and b"connection: close" in rest.lower()
    assert rest.endswith(b"}") and b'"name"' in rest


def test_coalescing_can_be_turned_off(start_server):
    from service.cli import _http_protocol
    from service.http_protocol import CoalescingHttpToolsProtocol
    from service.settings import Settings

    assert _http_protocol(Settings.from_env({})) is CoalescingHttpToolsProtocol
    assert _http_protocol(Settings.from_env({"BNFOLD_COALESCE_WRITES": "0"})) == "auto"
    server = start_server(BNFOLD_COALESCE_WRITES="0")
    meta = b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert _exchange(server, meta).startswith(b"HTTP/1.1 200")
