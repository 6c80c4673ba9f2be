"""never-read: raw HTTP/2 clients that open ListUsers streams and never read the socket."""

import asyncio
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events

from pat.users.v1 import user_service_pb2 as pb
from toolkit.floods.calls import SERVICE, FloodResult


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def never_read(
    address: str,
    *,
    seconds: float,
    connections: int = 200,
    streams: int = 100,
    page_size: int = 1000,
) -> FloodResult:
    """Raw HTTP/2 clients that send ListUsers calls and never read their responses.

    Each connection reads only the server's first SETTINGS (to learn
    MAX_CONCURRENT_STREAMS and acknowledge it), opens as many streams as that
    allows up to `streams`, and then never calls recv again: the responses
    back up into the server, which must hold or drop them. The sockets are
    closed after `seconds`.
    """
    result = FloodResult(extra={"connected": 0, "streams_opened": 0, "server_max_streams": None})
    body = grpc_frame(pb.ListUsersRequest(page_size=page_size).SerializeToString())
    sockets: list[socket.socket] = []
    try:
        await asyncio.gather(
            *(
                _never_reading_connection(address, streams, body, sockets, result)
                for _ in range(connections)
            )
        )
        await asyncio.sleep(seconds)
    finally:
        for sock in sockets:
            sock.close()
    return result


async def _never_reading_connection(
    address: str, streams: int, body: bytes, sockets: list[socket.socket], result: FloodResult
) -> None:
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sockets.append(sock)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    try:
        async with asyncio.timeout(10):
            await loop.sock_connect(sock, (host, int(port)))
            connection.initiate_connection()
            await loop.sock_sendall(sock, connection.data_to_send())
            await _read_server_settings(loop, sock, connection)
            allowed = min(streams, connection.remote_settings.max_concurrent_streams)
            for _ in range(allowed):
                _send_list_users(connection, address, body)
            await loop.sock_sendall(sock, connection.data_to_send())
    except (OSError, TimeoutError, _ServerClosed) as error:
        result.statuses.count(f"connection failed: {type(error).__name__}")
        return
    result.extra["connected"] += 1
    result.extra["streams_opened"] += allowed
    result.extra["server_max_streams"] = connection.remote_settings.max_concurrent_streams


class _ServerClosed(Exception):
    """The server ended the connection before sending its SETTINGS."""


async def _read_server_settings(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, connection: Any
) -> None:
    """The only reads a never-reading client makes: up to the server's first SETTINGS."""
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise _ServerClosed()
        events = connection.receive_data(data)
        await loop.sock_sendall(sock, connection.data_to_send())  # the SETTINGS ACK
        if any(isinstance(event, h2.events.RemoteSettingsChanged) for event in events):
            return


def _send_list_users(connection: Any, address: str, body: bytes) -> None:
    stream_id = connection.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", f"/{SERVICE}/ListUsers"),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    connection.send_headers(stream_id, headers)
    connection.send_data(stream_id, body, end_stream=True)
