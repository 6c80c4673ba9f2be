"""Load runs and their figures: h2load for fixed bodies, bench.h2grpc for varying ones.

Counting errors honestly matters more than anything else here. A gRPC error
is an HTTP 200 whose status sits in the trailers, and h2load counts it as a
success. So an h2load run is judged by the bytes it received instead: the
fixed request has one right answer, fetched with a gRPC client just before
the run, and every OK response carries exactly that answer's DATA bytes,
while an error response (trailers only) carries none. Hence

    ok = DATA bytes received / size of the right answer,  errors = done - ok,

and a remainder (some answer of another size) counts as an error too. This
only holds without h2load's --warm-up-time (its byte counter keeps the
warm-up's bytes while its request counters drop them), so the warm-up is a
run of its own. After every run one more gRPC call must still return the
right answer, byte for byte. bench.h2grpc reads each call's grpc-status
itself and needs none of this.
"""

import asyncio
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import h2grpc
from toolkit.processes import cpu_seconds

# Request metadata: (key, value) pairs.
Headers = Sequence[tuple[str, str]]


@dataclass
class Shape:
    """How load is applied: connections x streams calls in flight, for how long."""

    connections: int
    streams: int
    seconds: float
    warmup: float

    @property
    def in_flight(self) -> int:
        return self.connections * self.streams


@dataclass
class Run:
    """One measured run: one RPC against one server."""

    rpc: str
    server: str
    client: str
    calls: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    note: str = ""
    # CPU the server process spent per call during the measured run (where measured).
    server_cpu_us: float | None = None
    # CPU the primary PostgreSQL spent per call (the replicas section).
    primary_cpu_us: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The client for fixed-body runs: h2load when installed; `python -m bench --read-client` sets it.
read_client = "h2load" if shutil.which("h2load") else "h2grpc"


def have_h2load() -> bool:
    return read_client == "h2load"


def call_raw(
    address: str, path: str, body: bytes, timeout: float = 10, headers: Headers = ()
) -> bytes:
    """One unary call with a serialised request (and `headers` as metadata); the response."""
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        return bytes(call(body, timeout=timeout, metadata=headers or None))


def fixed_body_run(
    address: str,
    path: str,
    body: bytes,
    shape: Shape,
    server_pid: int | None = None,
    headers: Headers = (),
) -> Run:
    """Load with one request body (and `headers`), repeated: h2load, or bench.h2grpc without it.

    With `server_pid` (h2load only), the run also notes that process's CPU per call.
    """
    expected = call_raw(address, path, body, headers=headers)
    if have_h2load():
        warmup = None
        if shape.warmup > 0:
            warming = ["-D", _duration(shape.warmup)]
            warmup = _h2load(address, path, body, expected, shape, warming, headers)
        cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
        run = _h2load(
            address, path, body, expected, shape, ["-D", _duration(shape.seconds)], headers
        )
        if server_pid and run.calls:
            run.server_cpu_us = (cpu_seconds(server_pid) - cpu_before) * 1e6 / run.calls
            run.note = _join(run.note, f"server CPU {run.server_cpu_us:.0f} µs/call")
        if warmup and warmup.errors:  # not timed, but counted: zero errors means none at all
            run.errors += warmup.errors
            run.note = _join(run.note, f"{warmup.errors} of them during the warm-up")
    else:
        assert not headers, "headers need h2load"
        run = varying_body_run(address, path, lambda n: body, shape)
    _verify_after(run, address, path, body, expected)
    return run


def counted_run(address: str, path: str, body: bytes, shape: Shape, calls: int) -> Run:
    """Exactly `calls` calls with one body (no warm-up): h2load -n, or bench.h2grpc."""
    expected = call_raw(address, path, body)
    if have_h2load():
        run = _h2load(address, path, body, expected, shape, ["-n", str(calls)])
    else:
        run = varying_body_run(address, path, lambda n: body, shape, limit=calls)
    _verify_after(run, address, path, body, expected)
    return run


def varying_body_run(
    address: str,
    path: str,
    body: Callable[[int], bytes],
    shape: Shape,
    limit: int | None = None,
) -> Run:
    """Load where call n sends body(n), through bench.h2grpc; grpc-status read per call."""
    tally, window = asyncio.run(
        h2grpc.run(
            address,
            path,
            body,
            connections=shape.connections,
            streams=shape.streams,
            seconds=shape.seconds,
            warmup=shape.warmup,
            limit=limit,
        )
    )
    note = _status_note(tally.failures)
    p50, p99 = percentiles(tally.latencies)
    return Run("", "", "h2grpc", tally.ok, window, tally.ok / window, p50, p99, tally.errors, note)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _status_note(failures: dict[int, int]) -> str:
    """The non-OK statuses a run saw, e.g. "UNAVAILABLE x3"."""
    return ", ".join(
        f"{_CODE_NAMES.get(status, 'no grpc-status')} x{n}"
        for status, n in sorted(failures.items())
    )


def _verify_after(run: Run, address: str, path: str, body: bytes, expected: bytes) -> None:
    """One more call must still succeed with the very same answer."""
    try:
        answer = call_raw(address, path, body)
    except grpc.RpcError as error:
        run.errors += 1
        run.note = _join(run.note, f"call after the run failed: {error.code()}")
        return
    if answer != expected:
        run.errors += 1
        run.note = _join(run.note, "call after the run answered differently")


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def _h2load(
    address: str,
    path: str,
    body: bytes,
    expected: bytes,
    shape: Shape,
    length: list[str],
    headers: Headers = (),
) -> Run:
    with tempfile.TemporaryDirectory(prefix="pat-users-h2load-") as folder:
        data, log = Path(folder) / "request", Path(folder) / "log"
        data.write_bytes(h2grpc.grpc_message(body))
        command = [
            "h2load",
            *length,
            f"--clients={shape.connections}",
            f"--max-concurrent-streams={shape.streams}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            *(f"--header={key}: {value}" for key, value in headers),
            f"--data={data}",
            f"--log-file={log}",
            f"http://{address}{path}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
        output = done.stdout
        latencies = [int(line.split("\t")[2]) / 1e6 for line in log.read_text().splitlines()]
    return _h2load_run(output, len(h2grpc.grpc_message(expected)), latencies)


def _h2load_run(output: str, answer_size: int, latencies: list[float]) -> Run:
    seconds = _seconds(_find(r"finished in (\S+),", output))
    done = int(_find(r"(\d+) done", output))
    failed = int(_find(r"(\d+) failed", output))
    data = int(_find(r"\((\d+)\) data", output))
    ok, remainder = divmod(data, answer_size)
    errors = max(done - ok + (1 if remainder else 0), failed)
    notes = [
        "answers of an unexpected size" if remainder else "",
        f"h2load: {failed} failed" if failed else "",
        "no answer at all" if ok == 0 else "",
    ]
    errors = max(errors, 1 if ok == 0 else 0)
    note = _join(*notes)
    p50, p99 = percentiles(latencies)
    return Run("", "", "h2load", ok, seconds, ok / seconds, p50, p99, errors, note)


def _duration(seconds: float) -> str:
    """h2load takes whole units only: 500ms, not 0.5."""
    return f"{round(seconds * 1000)}ms"


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"h2load output without {pattern!r}:\n{text}")
    return match.group(1)


_SECONDS_PER = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(value: str) -> float:
    """h2load's "850us", "12.5ms" or "3.00s", in seconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    assert match is not None, value
    return float(match.group(1)) * _SECONDS_PER[match.group(2)]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (nearest rank); NaN without data."""
    if not latencies:
        return float("nan"), float("nan")
    ordered = sorted(latencies)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return rank(0.50), rank(0.99)
