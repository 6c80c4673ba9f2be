"""`python -m service` as a child process: its environment, its start, its log, its stop.

One launcher for every caller. Tests await it and read the log in memory;
`make floods` does too and may keep a copy of the log in a file, and runs
another checkout's server with --server-root; `make bench` blocks, lets the
server write its log straight into a file and waits for Health SERVING and
for every worker to listen. The log is read by a thread, so that blocking
and async callers share one implementation; async callers poll it.
"""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from toolkit import PROJECT_ROOT
from toolkit.processes import listening_sockets

SERVICE_COMMAND = (sys.executable, "-m", "service")
# How often async callers look at the log and at the process.
POLL_SECONDS = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


def subprocess_env(checkout: Path = PROJECT_ROOT, /, **overrides: str) -> dict[str, str]:
    """The environment of a child process (the service, alembic, make, pip) of `checkout`.

    This process's environment without DATABASE_URL and GRPC_PORT (a child
    gets the ones its caller names, never the developer's own), gRPC's fork
    support off (the embedded PostgreSQL forks helpers while gRPC's threads
    run), then `overrides`. For another checkout than this one, PYTHONPATH
    puts that checkout's `service` and generated `pat` ahead of the ones this
    virtualenv has installed (editable, from this checkout).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GRPC_PORT")}
    env["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    if checkout.resolve() != PROJECT_ROOT:
        env["PYTHONPATH"] = f"{checkout}{os.pathsep}{checkout / 'generated'}"
    env.update(overrides)
    return env


class DidNotStart(RuntimeError):
    """The child exited, or did not get as far as asked in time; the message holds its log."""


class ServiceProcess:
    """A server (by default `python -m service`) running as a child process.

    Its log (stderr) is read line by line into `log`, and copied to
    `log_path` if given; with `read_log=False` the child writes stdout and
    stderr straight into `log_path` instead, and this process never touches
    them. The port is the one the caller chose (`port`), or the one the log
    says it listens on.

    By default the child leads a process group of its own, as a command
    started from a terminal does, and every signal goes to the whole group
    (PostgreSQL under `make run`, say). The bench and the floods keep their
    servers in their own group instead, so that a Ctrl-C stops them too.

    Blocking methods serve `make bench`; the coroutines (`start`, `reached`,
    `wait`, `kill`) the tests' and the floods' event loops.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        port: int,
        log_path: Path | None,
        read_log: bool,
        own_process_group: bool,
    ) -> None:
        self.process = process
        self.port = port
        self._port_from_log = not port
        self.log: list[str] = []
        self.log_path = log_path
        self._own_process_group = own_process_group
        self._reader: threading.Thread | None = None
        if read_log:
            self._reader = threading.Thread(target=self._read_log, daemon=True)
            self._reader.start()

    @classmethod
    def spawn(
        cls,
        env: dict[str, str],
        *,
        command: Sequence[str] = SERVICE_COMMAND,
        cwd: Path = PROJECT_ROOT,
        port: int = 0,
        log_path: Path | None = None,
        read_log: bool = True,
        own_process_group: bool = True,
    ) -> Self:
        """Start `command` and return at once; see the class for the options."""
        if not read_log and log_path is None:
            raise ValueError("a log that is not read must go to a file: give log_path")
        with contextlib.ExitStack() as files:
            output: int | IO[bytes] = subprocess.DEVNULL
            if log_path is not None and not read_log:
                output = files.enter_context(log_path.open("wb"))
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.PIPE if read_log else subprocess.STDOUT,
                start_new_session=own_process_group,
            )
        return cls(
            process,
            port=port,
            log_path=log_path,
            read_log=read_log,
            own_process_group=own_process_group,
        )

    @classmethod
    async def start(
        cls,
        env: dict[str, str],
        *,
        until: str = "listening on port",
        timeout: float = 60,
        command: Sequence[str] = SERVICE_COMMAND,
        cwd: Path = PROJECT_ROOT,
        log_path: Path | None = None,
        own_process_group: bool = True,
    ) -> Self:
        """Spawn, and return once a log line contains `until` (by default: the port is open).

        If the child exits first, or `timeout` passes, it is killed and
        DidNotStart raised.
        """
        child = cls.spawn(
            env,
            command=command,
            cwd=cwd,
            log_path=log_path,
            own_process_group=own_process_group,
        )
        try:
            await child.reached(until, timeout)
        except BaseException:
            await child.kill()
            raise
        return child

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        with contextlib.ExitStack() as files:
            copy = files.enter_context(self.log_path.open("w")) if self.log_path else None
            for raw in self.process.stderr:
                line = raw.decode(errors="replace").rstrip()
                match = re.search(r"listening on port (\d+)", line)
                if match and self._port_from_log:
                    self.port = int(match.group(1))
                self.log.append(line)
                if copy:
                    print(line, file=copy, flush=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def text(self) -> str:
        """The log so far: the lines read, or the log file."""
        if self._reader is None and self.log_path is not None:
            return self.log_path.read_text(errors="replace")
        return "\n".join(self.log)

    def _logged(self, text: str) -> bool:
        return any(text in line for line in self.log)

    async def reached(self, text: str, timeout: float = 60) -> None:
        """Until a log line contains `text`; DidNotStart if the child exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            # Asked before the log is searched: once the child has exited and
            # its log is read to the end, a line not found will never come.
            finished = self.process.poll() is not None and not self._reading()
            if self._logged(text):
                return
            if finished:
                raise DidNotStart(self._failure(f"exited ({self.process.returncode})"))
            if time.monotonic() > deadline:
                raise DidNotStart(self._failure(f"logged no {text!r} within {timeout:g} s"))
            await asyncio.sleep(POLL_SECONDS)

    def _reading(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def _failure(self, what: str) -> str:
        return f"{self.process.args!r} {what}:\n{self.text[-3000:]}"

    def wait_until_answering(self, timeout: float = 60) -> None:
        """Until Health/Check says SERVING (blocking).

        A server without the health service (bench/baseline.py) answers
        UNIMPLEMENTED: that counts too.
        """
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DidNotStart(self._failure(f"exited ({self.process.returncode})"))
                try:
                    if check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                        return
                except grpc.RpcError as error:
                    if isinstance(error, grpc.Call) and error.code() == UNIMPLEMENTED:
                        return
                time.sleep(0.1)
        raise DidNotStart(self._failure(f"did not answer within {timeout:g} s"))

    def wait_for_listeners(self, count: int, timeout: float = 60) -> int:
        """Until `count` sockets listen on the port (blocking); how many do.

        Health answers as soon as one worker listens; the others bind the
        same port (SO_REUSEPORT) a little later, and connections made before
        then would all land on the first one.
        """
        deadline = time.monotonic() + timeout
        while (listening := listening_sockets(self.port)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return listening

    def send_signal(self, number: signal.Signals) -> None:
        """Send `number` to the child, or to its whole process group if it leads one."""
        with contextlib.suppress(ProcessLookupError):
            if self._own_process_group:
                os.killpg(self.process.pid, number)
            else:
                self.process.send_signal(number)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT (to the whole process group if the child leads one)."""
        self.send_signal(signal.SIGINT)

    async def wait(self, timeout: float = 60) -> int:
        """Until the child has exited and its log is read to the end; its exit code.

        TimeoutError after `timeout` seconds; the child is left running.
        """
        async with asyncio.timeout(timeout):
            await self._exited()
            while self._reading():  # noqa: ASYNC110 - a thread reads the log
                await asyncio.sleep(POLL_SECONDS)
        return int(self.process.returncode)

    async def _exited(self) -> None:
        while self.process.poll() is None:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(POLL_SECONDS)

    async def kill(self) -> None:
        """SIGKILL, unless the child has exited already; then wait until it has."""
        if self.process.poll() is None:
            self.send_signal(signal.SIGKILL)
            await self._exited()

    def stop(self, number: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `number`, wait up to `timeout` s, then SIGKILL (blocking); the exit code."""
        if self.process.poll() is None:
            self.send_signal(number)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return int(self.process.returncode)


async def wait_until_serving(
    channel: grpc.aio.Channel, service: str = "", timeout: float = 15
) -> None:
    """Until Health.Watch of `service` on `channel` says SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    async for reply in health.Watch(request, timeout=timeout):
        if reply.status == SERVING:
            return
