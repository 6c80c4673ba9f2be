"""WORKERS > 1: a supervisor process and WORKERS server processes sharing one port.

One grpc.aio server is one event loop on one core. With WORKERS=N, `python -m
service` becomes a supervisor: it does what must happen once (the embedded
PostgreSQL and its migrations, in __main__), picks the port, and starts N
workers. Each worker is a lone server (`python -m service` with WORKERS=1) on
that port, with its own engine, pool and health watcher, so its health
answers tell the truth about itself. The kernel spreads new connections over
the workers' listening sockets (SO_REUSEPORT; server.py sets `grpc.so_reuseport`).

Workers are fresh interpreters, not forks. grpc's multiprocessing example
forks before any gRPC object exists; here, by then, the supervisor may have
started the embedded PostgreSQL and run Alembic (threads, an event loop,
sockets, held locks), and a forked child would inherit all of it half-way.
A fresh interpreter inherits the environment and one socket, at the cost of
about a second of imports per worker, once, in parallel.

- Stopping: SIGTERM or SIGINT to the supervisor is passed to every worker,
  which stops as a lone server does (drain, then grace); the supervisor exits
  0 once all have exited 0. Workers have process groups of their own, so a
  terminal's Ctrl-C reaches each of them once, through the supervisor.
- A worker's death: a worker that exits before any stop was asked for takes
  the service down. The others stop gracefully and the supervisor exits 1.
  A restart here would hide a crash likely to recur (a bug, the OOM killer)
  behind a service running short of workers; whoever runs the service
  (Kubernetes, systemd, a developer) sees the exit and restarts it whole.
- The supervisor's death: each worker holds one end of a socket pair whose
  other end only the supervisor holds. When that end closes, however the
  supervisor died, the worker stops gracefully: none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from service.config import Settings
from service.logs import label_records

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How the supervisor tells a worker its number and its end of the socket pair.
WORKER_NUMBER_VARIABLE = "PAT_USERS_WORKER"
SUPERVISOR_FD_VARIABLE = "PAT_USERS_SUPERVISOR_FD"

# A worker still running this long after drain + grace would never stop: killed.
STOP_SLACK_SECONDS = 5.0


class NotedSignals(Protocol):
    """The name of a stop signal received before the event loop ran, if any."""

    received: str | None


async def supervise(settings: Settings, database_url: str, startup: NotedSignals) -> int:
    """Run `settings.workers` workers on one port until stopped; return the exit status."""
    supervisor = Supervisor(settings)
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, supervisor.stop, signum)
    if startup.received:
        return 0
    with (
        reserved_port(settings.grpc_host, settings.grpc_port) as port,
        _reserved_health_port(settings) as health_port,
    ):
        environment = _worker_environment(settings, database_url, port, health_port)
        return await supervisor.run(environment, port)


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """GRPC_PORT; or, for 0, a free port held until the block exits.

    As in grpc's examples/python/multiprocessing: a socket bound with
    SO_REUSEPORT keeps other programs off the port while the workers bind it
    too; it never listens, so no connection is ever queued on it.
    """
    if port != 0:
        yield port
        return
    family, kind, _, _, address = socket.getaddrinfo(
        host.strip("[]"), 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
        yield int(holder.getsockname()[1])


@contextlib.contextmanager
def _reserved_health_port(settings: Settings) -> Iterator[int | None]:
    """HEALTH_PORT, shared by the workers as GRPC_PORT is (0: reserved alike); None if unset."""
    if settings.health_port is None:
        yield None
        return
    with reserved_port(settings.grpc_host, settings.health_port) as port:
        yield port


def _worker_environment(
    settings: Settings, database_url: str, port: int, health_port: int | None
) -> dict[str, str]:
    """Each worker is a lone server on the shared port and the one database.

    A page token must verify in whichever worker the next page's call
    reaches: every worker gets this run's PAGE_TOKEN_SECRET, the configured
    one or the random one `config.with_page_token_secret` chose.
    """
    assert settings.page_token_secret is not None  # __main__ chose one
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "GRPC_PORT": str(port),
        "WORKERS": "1",
        "PAGE_TOKEN_SECRET": settings.page_token_secret.get_secret_value(),
    }
    if health_port is not None:
        environment["HEALTH_PORT"] = str(health_port)
    return environment


def _own_metrics_port(
    environment: dict[str, str], settings: Settings, number: int
) -> dict[str, str]:
    """Worker `number` (from 1) serves its metrics on METRICS_PORT + number - 1.

    Each worker has its own pool, admission and health, so each is scraped on
    its own; with METRICS_PORT=0, each picks a free port (and logs it).
    """
    if not settings.metrics_port:
        return environment
    return {**environment, "METRICS_PORT": str(settings.metrics_port + number - 1)}


@dataclass
class Worker:
    """A worker process, and the supervisor's end of the socket pair shared with it."""

    number: int
    process: asyncio.subprocess.Process
    link: socket.socket

    @classmethod
    async def start(cls, number: int, environment: dict[str, str]) -> Worker:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with theirs, _stop_signals_blocked():
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service",
                env={
                    **environment,
                    WORKER_NUMBER_VARIABLE: str(number),
                    SUPERVISOR_FD_VARIABLE: str(theirs.fileno()),
                },
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                process_group=0,  # a terminal's signals reach the supervisor only
            )
        return cls(number, process, ours)

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"

    async def listening(self) -> bool:
        """Wait for the worker's word that it listens; False if it exited first."""
        return bool(await asyncio.get_running_loop().sock_recv(self.link, 64))

    def send(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def ending(self) -> str:
        code = self.process.returncode
        assert code is not None
        if code < 0:
            return f"{self.name} was killed by {signal.Signals(-code).name}"
        return f"{self.name} exited with status {code}"


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Spawn with stop signals blocked: the worker inherits the mask.

    It unblocks them once its own handlers are in place (StartupSignals in
    __main__), so a stop signal passed on during its start-up waits there
    instead of killing it before it can stop cleanly.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Supervisor:
    """Starts the workers, passes stop signals on, and watches for a death."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._workers: list[Worker] = []
        self._stop_signal: int | None = None
        self._stop_requested = asyncio.Event()

    def stop(self, signum: int) -> None:
        """A stop signal: pass it to every worker, each of which stops gracefully."""
        name = signal.Signals(signum).name
        logger.info("received %s; passing it to %d workers", name, len(self._workers))
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        self._stop_signal = signum
        self._stop_requested.set()
        for worker in self._workers:
            worker.send(signum)

    async def run(self, environment: dict[str, str], port: int) -> int:
        try:
            await self._start_workers(environment)
            return await self._watch(port)
        finally:
            for worker in self._workers:
                worker.link.close()

    async def _start_workers(self, environment: dict[str, str]) -> None:
        count = self._settings.workers
        for number in range(1, count + 1):
            if self._stop_signal is not None:
                return
            own_environment = _own_metrics_port(environment, self._settings, number)
            worker = await Worker.start(number, own_environment)
            self._workers.append(worker)
            logger.info("started worker %d of %d (pid %d)", number, count, worker.process.pid)
            if self._stop_signal is not None:  # it came while this worker was being spawned
                worker.send(self._stop_signal)

    async def _watch(self, port: int) -> int:
        """Announce the port once every worker listens; end at a stop signal or a death."""
        if not self._workers:
            return 0
        announcement = asyncio.create_task(self._announce(port))
        first_exit = asyncio.create_task(self._first_exit())
        stop = asyncio.create_task(self._stop_requested.wait())
        await asyncio.wait({first_exit, stop}, return_when=asyncio.FIRST_COMPLETED)
        announcement.cancel()
        stop.cancel()
        died = None if self._stop_requested.is_set() else first_exit.result()
        first_exit.cancel()
        if died is not None:
            logger.error("%s unexpectedly; stopping the service", died.ending())
            self._stop(signal.SIGTERM)
        failed = [worker for worker in await self._wait_for_exits() if worker is not died]
        for worker in failed:
            logger.error("%s", worker.ending())
        if died or failed:
            return 1
        logger.info("all %d workers stopped", len(self._workers))
        return 0

    async def _announce(self, port: int) -> None:
        listening = await asyncio.gather(*(worker.listening() for worker in self._workers))
        if all(listening):
            logger.info("listening on port %d (%d workers)", port, len(self._workers))

    async def _first_exit(self) -> Worker:
        exits = {asyncio.ensure_future(w.process.wait()): w for w in self._workers}
        try:
            done, _ = await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in exits:
                waiting.cancel()
        return exits[done.pop()]

    async def _wait_for_exits(self) -> list[Worker]:
        """Wait until every worker has exited, killing those that overstay; the failed ones."""
        limit = (
            self._settings.shutdown_drain_seconds
            + self._settings.shutdown_grace_seconds
            + STOP_SLACK_SECONDS
        )
        exits = [asyncio.ensure_future(worker.process.wait()) for worker in self._workers]
        _, overstaying = await asyncio.wait(exits, timeout=limit)
        if overstaying:
            for worker in self._workers:
                if worker.process.returncode is None:
                    logger.error("%s did not stop within %.0fs; killing it", worker.name, limit)
                    worker.send(signal.SIGKILL)
            await asyncio.wait(overstaying)
        return [worker for worker in self._workers if worker.process.returncode != 0]


class SupervisorLink:
    """A worker's end of the socket pair it shares with its supervisor.

    The worker writes one line once it listens. The supervisor never writes,
    so the socket turns readable only when the supervisor's end closes: when
    the supervisor has exited, even by SIGKILL.
    """

    def __init__(self, link: socket.socket) -> None:
        self._socket = link

    def listening(self, stop_requested: asyncio.Event) -> None:
        """Tell the supervisor; from now on, its exit stops this worker too."""
        with contextlib.suppress(OSError):  # the supervisor is gone: the reader sees that
            self._socket.sendall(b"listening\n")
        loop = asyncio.get_running_loop()
        loop.add_reader(self._socket, self._supervisor_gone, stop_requested)

    def _supervisor_gone(self, stop_requested: asyncio.Event) -> None:
        asyncio.get_running_loop().remove_reader(self._socket)
        logger.warning("the supervisor has exited; stopping")
        stop_requested.set()


def attach_to_supervisor() -> SupervisorLink | None:
    """In a worker: label its log lines, return its link. In a lone server: None."""
    fd = os.environ.pop(SUPERVISOR_FD_VARIABLE, None)
    if fd is None:
        return None
    label_records(f"worker {os.environ.pop(WORKER_NUMBER_VARIABLE, '?')}")
    return SupervisorLink(socket.socket(fileno=int(fd)))
