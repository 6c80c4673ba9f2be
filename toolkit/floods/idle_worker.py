"""An idle-conns worker process: `python -m toolkit.floods.idle_worker ADDRESS COUNT HOLD`."""

import asyncio
import contextlib
import json
import resource
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any


async def idle_worker(address: str, count: int, hold: float) -> None:
    """In a worker process: hold `count` connections that never send a byte.

    Reports (one JSON line a second) how many connected, failed to connect
    within 5 s, and were closed by the server, with how long each had lived.
    Ends after `hold` seconds or on SIGTERM.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    state: dict[str, Any] = {"connected": 0, "failed": 0, "closed": 0, "opening_done": False}
    # How long each closed connection lived, in whole seconds: {seconds: connections}.
    lifetimes: Counter[int] = Counter()
    host, port = address.rsplit(":", 1)
    gate = asyncio.Semaphore(500)
    sockets: dict[int, socket.socket] = {}

    async def open_one() -> None:
        async with gate:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                async with asyncio.timeout(5):
                    await loop.sock_connect(sock, (host, int(port)))
            except (OSError, TimeoutError):
                sock.close()
                state["failed"] += 1
                return
            state["connected"] += 1
            sockets[sock.fileno()] = sock
            loop.add_reader(sock.fileno(), _on_readable, sock, time.monotonic())

    def _on_readable(sock: socket.socket, opened: float) -> None:
        """The server spoke (its SETTINGS: discarded) or closed the connection."""
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(sock.fileno())
        sockets.pop(sock.fileno(), None)
        sock.close()
        state["closed"] += 1
        lifetimes[int(time.monotonic() - opened)] += 1

    def report() -> None:
        print(json.dumps({**state, "lifetimes": lifetimes}), flush=True)

    async def opener() -> None:
        await asyncio.gather(*(open_one() for _ in range(count)))
        state["opening_done"] = True

    opening = asyncio.create_task(opener())
    deadline = time.monotonic() + hold
    while not stop.is_set() and time.monotonic() < deadline:
        report()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    opening.cancel()
    report()
    for sock in sockets.values():
        sock.close()


if __name__ == "__main__":
    asyncio.run(idle_worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
