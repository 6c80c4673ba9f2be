"""A lean closed-loop gRPC load generator over raw HTTP/2, for calls whose bodies differ.

h2load sends one fixed body, so writes (each CreateUser needs its own email,
each UpdateUser should hit its own row) need a client of ours. A grpc.aio
client spends about as much CPU per call as the server it measures, and on a
shared 2-core machine that squeezes every ratio towards 1. This one writes
pre-encoded HTTP/2 frames from asyncio protocol callbacks (no coroutine per
call, no channel machinery) and reads back only what it must: the trailers'
`grpc-status`, decoded with hpack, so every non-OK status is counted.

Each connection keeps `streams` calls in flight: when one ends, the next is
written from the same callback. Only calls that end inside the measured
window count; those ending during the warm-up are dropped.
"""

import asyncio
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
# Receive windows large enough that a run never waits on flow control.
STREAM_WINDOW = 1 << 24
CONNECTION_WINDOW = 1 << 30
# A status for calls that ended without grpc-status (RST_STREAM, GOAWAY, lost connection).
NO_STATUS = -1

Body = Callable[[int], bytes]


@dataclass
class Tally:
    """What a load run saw: OK calls ending in the measured window, and every failure.

    Failures count whenever they happen, warm-up included: "zero errors"
    means none at all, not none while the stopwatch ran.
    """

    latencies: list[float] = field(default_factory=list)  # OK calls in the window
    failures: Counter[int] = field(default_factory=Counter)  # grpc-status -> calls, any time
    measure_from: float = 0.0
    measure_until: float = float("inf")
    issued: int = 0

    def record(self, started: float, ended: float, status: int) -> None:
        if status != 0:
            self.failures[status] += 1
        elif self.measure_from <= ended <= self.measure_until:
            self.latencies.append(ended - started)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def grpc_message(body: bytes) -> bytes:
    """gRPC's length-prefixed message framing (uncompressed)."""
    return struct.pack(">?I", False, len(body)) + body


def request_headers(authority: str, path: str) -> bytes:
    """One HPACK block for every call: never-indexed literals leave no dynamic-table state."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return Encoder().encode([NeverIndexedHeaderTuple(name, value) for name, value in headers])


class Connection(asyncio.Protocol):
    """One HTTP/2 connection keeping `streams` unary calls in flight."""

    def __init__(
        self,
        headers: bytes,
        body: Body,
        counter: Callable[[], int | None],
        tally: Tally,
        streams: int,
    ) -> None:
        self._headers = headers
        self._body = body
        self._counter = counter
        self._tally = tally
        self._streams = streams
        self._next_stream = 1
        self._started: dict[int, float] = {}
        self._buffer = b""
        self._block = b""  # a header block awaiting its CONTINUATION frames
        self._block_flags = 0
        self._out: list[bytes] = []  # frames written at the end of each callback
        self._decoder = Decoder()
        self._send_window = 65535
        self._waiting: list[bytes] = []  # DATA frames held back by flow control
        self._received = 0
        self._transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = struct.pack(
            ">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW
        )
        increment = struct.pack(">I", CONNECTION_WINDOW - 65535)
        self._out += [
            PREFACE,
            frame(SETTINGS, 0, 0, settings),
            frame(WINDOW_UPDATE, 0, 0, increment),
        ]
        for _ in range(self._streams):
            self._call()
        self._flush()

    def _flush(self) -> None:
        """One write (one syscall) for every frame a callback produced."""
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()

    def _call(self) -> None:
        """Start the next call, or finish once there is none left and none in flight."""
        assert self._transport is not None
        n = self._counter()
        if n is None:
            if not self._started and not self.done.done():
                self.done.set_result(None)
                self._flush()
                self._transport.close()
            return
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        data = grpc_message(self._body(n))
        self._started[stream] = time.perf_counter()
        self._out.append(frame(HEADERS, END_HEADERS, stream, self._headers))
        self._send(frame(DATA, END_STREAM, stream, data), len(data))

    def _send(self, data_frame: bytes, size: int) -> None:
        if self._waiting or size > self._send_window:
            self._waiting.append(data_frame)
            return
        self._send_window -= size
        self._out.append(data_frame)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        offset = 0
        while len(buffer) - offset >= 9:
            length = int.from_bytes(buffer[offset : offset + 3], "big")
            end = offset + 9 + length
            if end > len(buffer):
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            stream = int.from_bytes(buffer[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            self._frame(kind, flags, stream, buffer[offset + 9 : end])
            offset = end
        self._buffer = buffer[offset:]
        self._flush()

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            self._consumed(len(payload))
        elif kind in (HEADERS, CONTINUATION):
            self._header_fragment(kind, flags, stream, payload)
        elif kind == SETTINGS and not flags & ACK:
            self._out.append(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._out.append(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and stream == 0:
            self._send_window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            self._flush_waiting()
        elif kind == RST_STREAM:
            self._end(stream, NO_STATUS)
        elif kind == GOAWAY:
            self.connection_lost(None)  # the calls in flight count as errors
            assert self._transport is not None
            self._transport.close()

    def _consumed(self, size: int) -> None:
        """Give the server its connection window back once half of it is used."""
        self._received += size
        if self._received > CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
            self._received = 0

    def _flush_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for data_frame in waiting:
            self._send(data_frame, len(data_frame) - 9)

    def _header_fragment(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            self._block_flags = flags
        self._block += payload
        if not flags & END_HEADERS:
            return
        block, self._block = self._block, b""
        # Decode every block, even unneeded ones: that keeps the dynamic table in step.
        headers = cast(list[tuple[str, str]], self._decoder.decode(block))
        if self._block_flags & END_STREAM:
            status = next((int(v) for k, v in headers if k == "grpc-status"), NO_STATUS)
            self._end(stream, status)

    def _end(self, stream: int, status: int) -> None:
        started = self._started.pop(stream, None)
        if started is not None:
            self._tally.record(started, time.perf_counter(), status)
            self._call()

    def connection_lost(self, exc: Exception | None) -> None:
        now = time.perf_counter()
        for started in self._started.values():
            self._tally.record(started, now, NO_STATUS)
        self._started.clear()
        if not self.done.done():
            self.done.set_result(None)


async def run(
    address: str,
    path: str,
    body: Body,
    *,
    connections: int,
    streams: int,
    seconds: float,
    warmup: float,
    limit: int | None = None,
) -> tuple[Tally, float]:
    """Keep connections x streams calls of `path` in flight; returns the tally and the window.

    Call n sends `body(n)`. With `limit`, exactly that many calls are made
    and all of them count (no warm-up); otherwise calls start until the
    warm-up plus `seconds` has passed.
    """
    host, port = address.rsplit(":", 1)
    headers = request_headers(address, path)
    tally = Tally()
    numbers = iter(range(limit)) if limit is not None else None
    issued = 0
    stop_at = float("inf")

    def counter() -> int | None:
        nonlocal issued
        if numbers is not None:
            n = next(numbers, None)
        else:
            n = issued if time.perf_counter() < stop_at else None
        if n is not None:
            issued += 1
        return n

    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    if limit is None:
        tally.measure_from, stop_at = start + warmup, start + warmup + seconds
        tally.measure_until = stop_at
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: Connection(headers, body, counter, tally, streams), host, int(port)
        )
        protocols.append(protocol)
    await asyncio.gather(*(protocol.done for protocol in protocols))
    window = seconds if limit is None else time.perf_counter() - start
    tally.issued = issued
    return tally, window
