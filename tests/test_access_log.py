"""The access log: one line per UserService RPC, seen in the records a real server writes."""

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from pythonjsonlogger.json import JsonFormatter

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service import access_log, logs
from service.server import RunningServer
from tests.support import (
    ServiceProcess,
    create_user,
    eventually,
    fails,
    failure_of,
    health_status,
    hold_row_lock,
    serving,
    subprocess_env,
    user_service,
    wait_until_serving,
)
from tests.test_auth import READER_METHODS, bearer, token_line

FIELDS = ("method", "code", "duration_ms", "peer", "caller", "request_id")
TEXT_LINE = re.compile(
    r"method=(\w+) code=(\w+) duration_ms=(\d+\.\d) peer=(\S+) caller=(\S+) request_id=(\S+)"
)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of `service.access`; set before the server starts, which looks once."""
    caplog.set_level(logging.INFO, logger="service.access")
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "service.access"]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in FIELDS}


def echoed(metadata: object) -> str:
    ids = [value for key, value in metadata if key == "x-request-id"]  # type: ignore[attr-defined]
    assert len(ids) == 1, metadata
    return str(ids[0])


@pytest.fixture
async def server(
    database_url: str, access: pytest.LogCaptureFixture
) -> AsyncIterator[RunningServer]:
    async with serving(database_url) as running:
        yield running


async def test_one_line_per_call_with_its_fields_and_no_request_values(
    server: RunningServer, access: pytest.LogCaptureFixture
) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    async with user_service(server) as stub:
        call = stub.CreateUser(
            pb.CreateUserRequest(user=user_pb2.User(email=email, display_name="Ada Lovelace")),
            metadata=(("x-request-id", "req-1"),),
        )
        await call
        assert echoed(await call.trailing_metadata()) == "req-1"
    await health_status(f"127.0.0.1:{server.port}")  # probes are not logged

    [record] = lines(access)
    assert record.levelno == logging.INFO
    logged = fields(record)
    assert logged["method"] == "CreateUser"
    assert logged["code"] == "OK"
    assert isinstance(logged["duration_ms"], float)
    assert 0 < logged["duration_ms"] < 5000
    assert str(logged["peer"]).startswith("ipv4:127.0.0.1:")
    assert (logged["caller"], logged["request_id"]) == ("-", "req-1")
    text = record.getMessage()
    match = TEXT_LINE.fullmatch(text)
    assert match is not None, text
    assert match.groups()[:2] == ("CreateUser", "OK")
    assert match.groups()[3:] == (logged["peer"], "-", "req-1")
    # Personal data stays out: neither the email nor any other field value.
    everything = text + json.dumps(logged)
    assert "ada-" not in everything
    assert "Lovelace" not in everything


async def test_errors_are_logged_with_their_code_and_a_generated_id_echoed(
    server: RunningServer, access: pytest.LogCaptureFixture
) -> None:
    async with user_service(server) as stub:
        errors = []
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
            errors.append(raised.value)

    ids = [echoed(error.trailing_metadata()) for error in errors]
    assert ids[0] != ids[1]
    # The id rides along the status's own details, which still parse.
    failure = failure_of(errors[0])
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.detail(error_details_pb2.ResourceInfo).resource_name
    logged = [fields(record) for record in lines(access)]
    assert [(f["method"], f["code"], f["request_id"]) for f in logged] == [
        ("GetUser", "NOT_FOUND", ids[0]),
        ("GetUser", "NOT_FOUND", ids[1]),
    ]


@pytest.mark.parametrize(
    "hostile",
    [
        "req caller=root request_id=forged",  # spaces would forge fields in a text line
        "x" * 129,  # too long
        "",
        'quote"and\\backslash but space',
    ],
)
async def test_a_hostile_request_id_is_replaced_by_a_generated_one(
    server: RunningServer, access: pytest.LogCaptureFixture, hostile: str
) -> None:
    async with user_service(server) as stub:
        call = stub.ListUsers(
            pb.ListUsersRequest(page_size=1), metadata=(("x-request-id", hostile),)
        )
        await call
        given = echoed(await call.trailing_metadata())
    [record] = lines(access)
    assert record.request_id == given  # type: ignore[attr-defined]
    assert given != hostile
    assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", given)
    if hostile:
        assert hostile not in record.getMessage()


async def test_the_longest_accepted_request_id_is_kept(
    server: RunningServer, access: pytest.LogCaptureFixture
) -> None:
    longest = "a-Z_0.9:/~!" * 11 + "x" * 7
    assert len(longest) == 128
    async with user_service(server) as stub:
        call = stub.ListUsers(
            pb.ListUsersRequest(page_size=1), metadata=(("x-request-id", longest),)
        )
        await call
        assert echoed(await call.trailing_metadata()) == longest
    assert lines(access)[0].request_id == longest  # type: ignore[attr-defined]


async def test_refused_calls_are_logged_with_their_caller(
    database_url: str, access: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    tokens = tmp_path / "callers"
    tokens.write_text(f"{token_line('writer', 'w')}\n{token_line('reader', 'r', READER_METHODS)}\n")
    async with (
        serving(database_url, auth_tokens_file=tokens) as running,
        user_service(running) as stub,
    ):
        user = await stub.CreateUser(
            pb.CreateUserRequest(user=user_pb2.User(email=f"{uuid.uuid4().hex}@example.com")),
            metadata=bearer("w"),
        )
        await fails(stub.GetUser(pb.GetUserRequest(id=user.user.id)))
        await fails(stub.GetUser(pb.GetUserRequest(id=user.user.id), metadata=bearer("nope")))
        await fails(stub.DeleteUser(pb.DeleteUserRequest(id=user.user.id), metadata=bearer("r")))
    logged = [(f["method"], f["code"], f["caller"]) for f in map(fields, lines(access))]
    assert logged == [
        ("CreateUser", "OK", "writer"),
        ("GetUser", "UNAUTHENTICATED", "-"),
        ("GetUser", "UNAUTHENTICATED", "-"),
        ("DeleteUser", "PERMISSION_DENIED", "reader"),
    ]


async def test_overloaded_and_timed_out_calls_are_logged(
    database_url: str, access: pytest.LogCaptureFixture
) -> None:
    async with (
        serving(database_url, max_concurrent_rpcs=1) as running,
        user_service(running) as stub,
    ):
        user = await create_user(stub)
        lock = await hold_row_lock(database_url, user.id)
        try:
            update = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="late"))
            late = await fails(stub.UpdateUser(update, timeout=0.5))
            assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: in_progress(running), 0)  # its slot is free again
            held = asyncio.ensure_future(stub.UpdateUser(update, timeout=30))
            await eventually(lambda: in_progress(running), 1)
            refused = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
            assert refused.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await lock.close()
        await held
    codes = [(f["method"], f["code"]) for f in map(fields, lines(access))]
    assert codes[0] == ("CreateUser", "OK")
    assert set(codes[1:]) == {
        ("UpdateUser", "DEADLINE_EXCEEDED"),
        ("GetUser", "UNAVAILABLE"),
        ("UpdateUser", "OK"),
    }


async def in_progress(running: RunningServer) -> int:
    return running.admission.in_progress


async def test_access_log_false_logs_nothing_and_echoes_nothing(
    database_url: str, access: pytest.LogCaptureFixture
) -> None:
    async with serving(database_url, access_log=False) as running, user_service(running) as stub:
        call = stub.ListUsers(pb.ListUsersRequest(page_size=1), metadata=(("x-request-id", "r"),))
        await call
        assert not [key for key, _ in await call.trailing_metadata() if key == "x-request-id"]
    assert lines(access) == []


async def test_json_format_writes_one_object_per_call(database_url: str) -> None:
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_PORT="0",
        GRPC_HOST="127.0.0.1",
        LOG_FORMAT="json",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            stub = UserServiceStub(channel)
            await fails(
                stub.GetUser(pb.GetUserRequest(id="not-an-id"), metadata=(("x-request-id", "j-1"),))
            )
        child.interrupt()
        assert await child.wait() == 0, child.text
    finally:
        await child.kill()
    objects = [json.loads(line) for line in child.log if line.startswith("{")]
    assert len(objects) == len(child.log), child.text  # every line is JSON
    [access] = [o for o in objects if o.get("name") == "service.access"]
    assert {key: access[key] for key in FIELDS if key not in ("duration_ms", "peer")} == {
        "method": "GetUser",
        "code": "INVALID_ARGUMENT",
        "caller": "-",
        "request_id": "j-1",
    }
    assert isinstance(access["duration_ms"], float)
    assert access["peer"].startswith("ipv4:127.0.0.1:")
    assert access["levelname"] == "INFO"
    assert "not-an-id" not in json.dumps(access)


# What writes the lines (service/logs.py): cheap, and the same text as logging's own.


def test_the_formatters_write_what_logging_would() -> None:
    text = logs._TextFormatter(logs.TEXT_FORMAT)
    as_json = logs._JsonFormatter(JSON_FORMAT)
    start = 1_800_000_000.0
    for created in (start, start + 0.25, start + 0.999, start + 1.0, start + 61.5, start + 0.5):
        record = logging.makeLogRecord(
            {"name": "service.access", "levelno": logging.INFO, "levelname": "INFO", "msg": "m"}
        )
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.method = "GetUser"
        assert text.format(record) == logging.Formatter(logs.TEXT_FORMAT).format(record)
        assert as_json.format(record) == JsonFormatter(JSON_FORMAT).format(record)


JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


Log = Callable[..., None]


@pytest.fixture
def batched(request: pytest.FixtureRequest, capfd: pytest.CaptureFixture[str]) -> Iterator[Log]:
    """`log(message, logger=..., level=...)` through a BatchedStderr of its own.

    Its timer waits an hour unless the test asks otherwise, so what is
    written before that is what the handler chose to write.
    """
    handler = logs.BatchedStderr(flush_seconds=getattr(request, "param", 3600))
    handler.setFormatter(logging.Formatter("%(message)s"))

    def log(message: str, logger: str = "service.access", level: int = logging.INFO) -> None:
        handler.handle(logging.makeLogRecord({"name": logger, "levelno": level, "msg": message}))

    yield log
    handler.close()
    handler.flush()  # what is left goes to capfd, not to the terminal at exit
    capfd.readouterr()


def test_access_lines_wait_and_any_other_line_writes_them_in_order(
    batched: Log, capfd: pytest.CaptureFixture[str]
) -> None:
    batched("one")
    batched("two")
    assert capfd.readouterr().err == ""
    batched("listening", logger="service.server")
    assert capfd.readouterr().err == "one\ntwo\nlistening\n"
    batched("three")
    batched("trouble", logger="service.auth", level=logging.ERROR)
    assert capfd.readouterr().err == "three\ntrouble\n"


def test_lines_go_out_whole_in_writes_of_at_most_pipe_buf(
    batched: Log, capfd: pytest.CaptureFixture[str]
) -> None:
    line = "x" * 99
    for _ in range(100):  # 10,000 bytes
        batched(line)
    written = capfd.readouterr().err
    assert written  # past PIPE_BUF, without waiting for the timer
    assert written == f"{line}\n" * (len(written) // 100)
    assert logs._whole_lines_chunks([b"a" * 3, b"b" * 3, b"c" * 9, b"d"], 7) == [
        b"aaabbb",
        b"c" * 9,
        b"d",
    ]


@pytest.mark.parametrize("batched", [0.05], indirect=True)
async def test_access_lines_are_written_within_the_flush_interval(
    batched: Log, capfd: pytest.CaptureFixture[str]
) -> None:
    batched("soon")

    async def written() -> str:
        return capfd.readouterr().err

    await eventually(written, "soon\n", within=2)


# The access log's own path past logging (logs.DirectLines): the same lines, fewer µs.


class EndedCall:
    """What Entry.write asks of a call's context: one that returned OK."""

    def code(self) -> None:
        return None

    def time_remaining(self) -> None:
        return None


NOW_NS = 1_800_000_000_123_456_789  # 2027-01-15, 08:00:00.123 UTC


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("label", [None, "worker 2"])
def test_direct_lines_are_what_logging_writes(
    json_format: bool,
    label: str | None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Byte for byte: a line made without a LogRecord, and logging's from the record.

    Odd peers and callers included: text lines write what is not UTF-8-able
    backslash-escaped, JSON escapes anything past ASCII.
    """
    formatter = (
        logs._JsonFormatter(logs.JSON_FORMAT)
        if json_format
        else logs._TextFormatter(logs.TEXT_FORMAT)
    )
    handler = logs.BatchedStderr(flush_seconds=3600)
    handler.setFormatter(formatter)
    factory = logging.getLogRecordFactory()
    if label is not None:
        monkeypatch.setattr(logging, "_logRecordFactory", logs.LabelledRecords(label, factory))
    prefix = f"{label}: " if label else ""
    direct = Taken(logs.DirectLines(access_log.logger, handler, prefix), handler)
    monkeypatch.setattr(time, "time", lambda: NOW_NS / 1e9)
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0)
    caplog.set_level(logging.INFO, logger="service.access")
    capfd.readouterr()
    cases = [
        ("GetUser", "ipv4:127.0.0.1:34834", "orders", "checkout-7f3a"),
        ("DeleteUser", "ipv6:[::1]:5000", "-", "42e1f36dbbf169ce-2"),
        ("ListUsers", "unix:/run/pat users/ü.sock", "zoë\ud800", 'r%s%d{x}"\\'),
    ]
    expected = []
    for method, peer, caller, request_id in cases:
        for lines in (direct, None):
            entry = access_log.Entry(request_id, peer, json_format, lines, started=99.9877)
            entry.write(EndedCall(), method, caller, returned=True)  # type: ignore[arg-type]
        [record] = lines_of(caplog)
        caplog.clear()
        record.created, record.msecs = NOW_NS / 1e9, float(NOW_NS % 10**9 // 10**6)
        line = handler.format(record) + "\n"
        expected.append(line.encode("utf-8", "backslashreplace").decode())
    handler.flush()
    written = capfd.readouterr().err
    handler.close()
    assert written == "".join(expected)
    assert "12.3" in written  # the duration, as logged
    if label is not None:
        assert written.count(f"{label}: ") == len(cases)


class Taken:
    """DirectLines as if the service's handler alone took records (here pytest's do too)."""

    def __init__(self, direct: logs.DirectLines, handler: logs.BatchedStderr) -> None:
        self._direct, self._handler = direct, handler

    def write(
        self,
        message: str,
        args: tuple[object, ...] = (),
        fields: Mapping[str, object] | None = None,
    ) -> bool:
        self._handler.add(self._direct.line(time.time(), message, args, fields), wait=True)
        return True


def lines_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "service.access"]


@contextlib.contextmanager
def the_services_logging_alone() -> Iterator[logs.DirectLines]:
    """The access logger's DirectLines, its handler the root's only one (pytest's set aside).

    Not a fixture: pytest adds its handlers to the root after fixtures are set up.
    """
    handler = logs.BatchedStderr(flush_seconds=3600)
    handler.setFormatter(logs._TextFormatter(logs.TEXT_FORMAT))
    root = logging.getLogger()
    handlers, level = root.handlers, access_log.logger.level
    root.handlers = [handler]
    access_log.logger.setLevel(logging.INFO)
    try:
        direct = logs.direct_lines(access_log.logger)
        assert direct is not None
        yield direct
    finally:
        root.handlers = handlers
        access_log.logger.setLevel(level)
        handler.flush()
        handler.close()


def test_direct_lines_only_while_the_services_handler_alone_would_take_them(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logs, "RECHECK_SECONDS", 0.0)  # ask at every line, as handlers come and go
    with the_services_logging_alone() as alone:
        _only_while_alone(alone, monkeypatch)
    written = capfd.readouterr().err.splitlines()
    assert [line.partition(" INFO ")[2] for line in written] == ["service.access: here"]


def _only_while_alone(alone: logs.DirectLines, monkeypatch: pytest.MonkeyPatch) -> None:
    assert alone.sole_receiver()
    other = logging.NullHandler()
    for holder in ("", "service", "service.access"):  # a handler anywhere on the way
        logger = logging.getLogger(holder)
        logger.addHandler(other)
        assert not alone.sole_receiver(), holder
        logger.removeHandler(other)
    assert alone.sole_receiver()
    with monkeypatch.context() as patched:
        patched.setattr(access_log.logger, "filters", [lambda record: True])
        assert not alone.sole_receiver()
    with monkeypatch.context() as patched:
        patched.setattr(access_log.logger, "propagate", False)
        assert not alone.sole_receiver()  # the root's handler would not get it
    with monkeypatch.context() as patched:
        patched.setattr(logging, "_logRecordFactory", lambda *a, **k: logging.LogRecord(*a, **k))
        assert not alone.sole_receiver()
    other_handler = logging.NullHandler()
    logging.getLogger("service").addHandler(other_handler)
    assert not alone.write("not here")  # nothing written: log it the ordinary way
    logging.getLogger("service").removeHandler(other_handler)
    assert alone.write("here")
    access_log.logger.setLevel(logging.WARNING)
    assert not alone.sole_receiver()  # and logger.info drops it, as it should
    access_log.logger.setLevel(logging.INFO)
    assert alone.sole_receiver()


def test_a_direct_line_waits_for_its_batch_and_is_made_when_written(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with the_services_logging_alone() as direct:
        capfd.readouterr()
        entry = access_log.Entry("r-1", "ipv4:10.0.0.7:5000", False, direct)
        entry.write(EndedCall(), "GetUser", "orders", returned=True)  # type: ignore[arg-type]
        assert capfd.readouterr().err == ""  # made and written with its batch
    [line] = capfd.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    fields = r"method=GetUser code=OK duration_ms=\d+\.\d peer=ipv4:10.0.0.7:5000"
    assert re.fullmatch(
        rf"{stamp} INFO service.access: {fields} caller=orders request_id=r-1", line
    )


def test_only_the_services_own_logging_gets_direct_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler()])
    assert logs.direct_lines(access_log.logger) is None  # in-process tests: caplog gets records


async def test_sigterm_loses_no_line(database_url: str) -> None:
    """Every call answered before SIGTERM has its line in the log when the process has exited.

    Lines wait up to 0.2 s in a batch; the last ones are still waiting when
    the signal comes.
    """
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_PORT="0",
        GRPC_HOST="127.0.0.1",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    calls, in_flight = 400, 16
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            stub = UserServiceStub(channel)
            user = await create_user(stub)

            async def get(n: int) -> None:
                async with limit:
                    await stub.GetUser(
                        pb.GetUserRequest(id=user.id), metadata=(("x-request-id", f"n-{n}"),)
                    )

            limit = asyncio.Semaphore(in_flight)
            await asyncio.gather(*(get(n) for n in range(calls)))
            child.process.terminate()
        assert await child.wait() == 0, child.text
    finally:
        await child.kill()
    logged = [line for line in child.log if " service.access: " in line]
    gets = [line for line in logged if "method=GetUser code=OK" in line]
    assert len(gets) == calls, f"{len(gets)} GetUser lines for {calls} calls"
    assert len(logged) == calls + 1  # and the CreateUser
    ids = {TEXT_LINE.search(line).group(6) for line in gets}  # type: ignore[union-attr]
    assert ids == {f"n-{n}" for n in range(calls)}
