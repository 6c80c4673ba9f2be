"""The grpcurl and buf curl lines of README and docs/, run as written against a real server.

Every grpcurl and bufcurl command in the shell blocks of README.md and of each
docs/*.md page runs, in that order (README first, then the pages by name, each
top to bottom), with only the address and the placeholders (ID, ID2,
NEXT_PAGE_TOKEN, RESUME_TOKEN) replaced by real values from earlier answers;
each one's exit status and answer are checked against what the call must have
done. A command this file cannot run, or has no check for, fails the test: the
documentation cannot drift from what works.
"""

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2

from pat.users.v1 import user_pb2
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.certificates import CertificateAuthority
from tests.support import (
    PROJECT_ROOT,
    create_user,
    serving,
    subprocess_env,
    wait_until_serving,
)

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
README_ADDRESS = "localhost:50051"
PLACEHOLDERS = ("ID", "ID2", "NEXT_PAGE_TOKEN", "RESUME_TOKEN")
VENV_BIN = Path(sys.executable).parent
SERVICES = {"pat.users.v1.UserService", "grpc.health.v1.Health"}
TOKEN = "s3cr3t-token-of-the-readme-caller"
COMMAND_TIMEOUT = 20
Health = health_pb2.HealthCheckResponse


# --- reading the README and docs/ ---------------------------------------------------------


def pages() -> list[Path]:
    """README.md, then every page of docs/ by name."""
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class Command:
    """One shell command of the README or a docs page, as written there, and its words."""

    text: str
    page: str  # where it is written, relative to the checkout

    @property
    def argv(self) -> list[str]:
        return split(self.text)

    @property
    def program(self) -> str:
        return self.argv[0]


def split(text: str) -> list[str]:
    return shlex.split(text.replace("\\\n", " "), comments=True)


def readme_commands() -> list[Command]:
    """Every command of the pages' ```sh blocks; one may span lines (`\\`, or an open quote)."""
    commands: list[Command] = []
    for path in pages():
        page = str(path.relative_to(PROJECT_ROOT))
        text = path.read_text()
        for block in re.findall(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
            pending = ""
            for line in block.splitlines():
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                pending += line + "\n"
                if not line.endswith("\\") and _complete(pending):
                    commands.append(Command(pending.rstrip("\n"), page))
                    pending = ""
            assert not pending, f"a shell block of {page} ends inside a command: {pending}"
    return commands


def _complete(text: str) -> bool:
    try:
        split(text)
    except ValueError:  # a quote still open: the command goes on
        return False
    return True


def grpcurl_commands(flag: str) -> list[Command]:
    return [c for c in readme_commands() if c.program == "grpcurl" and flag in c.argv]


def bufcurl_commands() -> list[Command]:
    return [c for c in readme_commands() if c.program == "bufcurl"]


def bufcurl_alias() -> Command:
    (alias,) = [
        c for c in readme_commands() if c.program == "alias" and c.argv[1].startswith("bufcurl=")
    ]
    return alias


# --- running commands and checking their answers ------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def reply(self) -> dict[str, Any]:
        assert self.code == 0, self.output
        return snake(json.loads(self.stdout))


@dataclass
class Session:
    """Runs documented commands against one server, remembering what the answers told."""

    address: str
    cwd: Path
    env: dict[str, str]
    prefix: str = ""  # shell lines before each command (the bufcurl alias)
    health_servicer: health.aio.HealthServicer | None = None  # the server's: its status changes
    values: dict[str, str] = field(default_factory=dict)  # placeholder -> real value
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> as last answered
    first_page: list[str] = field(default_factory=list)
    watched: user_pb2.User | None = None  # created while a README WatchUsers watched
    checked: list[str] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        assert README_ADDRESS in text, f"not aimed at {README_ADDRESS}: {text}"
        text = text.replace(README_ADDRESS, self.address)
        for name in PLACEHOLDERS:
            if f'"{name}"' in text:
                assert name in self.values, f"{name} is used before an answer gave it: {text}"
                text = text.replace(f'"{name}"', json.dumps(self.values[name]))
        return text

    async def run(self, command: Command, **env: str) -> Result:
        process = await self._start(command, **env)
        stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        assert process.returncode is not None
        return Result(process.returncode, stdout.decode(), stderr.decode())

    async def _start(self, command: Command, **env: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            self.prefix + self.substitute(command.text),
            cwd=self.cwd,
            env={**self.env, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a streaming command is stopped with its whole group
        )

    async def run_and_check(self, command: Command) -> None:
        argv = split(self.substitute(command.text))
        target = _target(argv, self.address)
        if target.endswith("/Watch"):
            await self._check_watch(command, _request(argv))
        elif target.endswith("/WatchUsers"):
            await self._check_watch_users(command, _request(argv))
        else:
            self._check(target, _request(argv), await self.run(command))
        self.checked.append(command.text)

    def _check(self, target: str, request: dict[str, Any], result: Result) -> None:
        name = target.rpartition("/")[2].split()[0] if "/" in target else target.split()[0]
        check = getattr(self, f"_check_{name}", None)
        assert check is not None, f"no check for `{target}`: add one to this file"
        check(target, request, result)

    # What each kind of command must print.

    def _check_list(self, target: str, request: dict[str, Any], result: Result) -> None:
        assert result.code == 0, result.output
        assert set(result.stdout.split()) >= SERVICES, result.stdout

    def _check_describe(self, target: str, request: dict[str, Any], result: Result) -> None:
        symbol = target.split()[1]
        assert result.code == 0, result.output
        assert f"{symbol} is a " in result.stdout, result.stdout
        pool = descriptor_pool.Default()
        try:
            service = pool.FindServiceByName(symbol)
        except KeyError:  # a message: every field is described
            for name in pool.FindMessageTypeByName(symbol).fields_by_name:
                assert re.search(rf"\b{name} = \d+;", result.stdout), name
        else:  # a service: every RPC is
            for method in service.methods:
                assert f"rpc {method.name} (" in result.stdout, method.name

    def _check_services(self, target: str, request: dict[str, Any], result: Result) -> None:
        self._check_list(target, request, result)

    def _check_methods(self, target: str, request: dict[str, Any], result: Result) -> None:
        assert result.code == 0, result.output
        assert "pat.users.v1.UserService/GetUser" in result.stdout.split(), result.stdout

    def _check_CreateUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        user = self._remember(result.reply()["user"])
        assert user["email"] == request["user"]["email"]
        assert user.get("display_name", "") == request["user"].get("display_name", "")
        assert user["etag"] == "1"
        self.values.setdefault("ID", user["id"])

    def _check_GetUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        user = result.reply()["user"]
        assert user == self.users[request["id"]]

    def _check_BatchGetUsers(self, target: str, request: dict[str, Any], result: Result) -> None:
        users = result.reply()["users"]
        assert [user["id"] for user in users] == request["ids"]
        for user in users:
            assert user == self.users.get(user["id"], user)

    def _check_LookupUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        user = result.reply()["user"]
        assert user["email"].lower() == request["email"].lower()
        assert user == self.users[user["id"]]

    def _check_ListUsers(self, target: str, request: dict[str, Any], result: Result) -> None:
        reply = result.reply()
        ids = [user["id"] for user in reply["users"]]
        if "page_token" not in request:
            assert len(ids) == request["page_size"], reply
            self.first_page = ids
            self.values["NEXT_PAGE_TOKEN"] = reply["next_page_token"]
            return
        assert ids, reply
        assert not set(ids) & set(self.first_page), (ids, self.first_page)
        assert self.values["ID"] in self.first_page + ids  # the list finds the user

    def _check_UpdateUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        asked = request["user"]
        if self._refused_as_stale(asked, result):
            return
        before = self.users[asked["id"]]
        user = self._remember(result.reply()["user"])
        mask = request["update_mask"]
        paths = (
            mask["paths"] if isinstance(mask, dict) else [snake_name(p) for p in mask.split(",")]
        )
        for path in paths:
            assert user[path] == asked[path], path
        assert int(user["etag"]) == int(before["etag"]) + 1
        assert user["update_time"] > before["update_time"]

    def _check_DeleteUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        if not self._refused_as_stale(request, result):
            assert "delete_time" in self._remember(result.reply()["user"])

    def _check_UndeleteUser(self, target: str, request: dict[str, Any], result: Result) -> None:
        if not self._refused_as_stale(request, result):
            assert "delete_time" not in self._remember(result.reply()["user"])

    def _check_Check(self, target: str, request: dict[str, Any], result: Result) -> None:
        assert result.reply()["status"] == "SERVING"

    async def _check_watch(self, command: Command, request: dict[str, Any]) -> None:
        """Watch streams: its first answer is SERVING, then every change of status until stopped.

        The status changes here as the server's database watcher would change it.
        """
        assert self.health_servicer is not None, "a Watch needs the server's health to change"
        process = await self._start(command)
        try:
            assert process.stdout is not None
            answers = _json_stream(process.stdout)
            assert await anext(answers) == {"status": "SERVING"}
            for status in (Health.NOT_SERVING, Health.SERVING):
                await self.health_servicer.set(request["service"], status)
                assert await anext(answers) == {"status": Health.ServingStatus.Name(status)}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
            await process.wait()

    async def _check_watch_users(self, command: Command, request: dict[str, Any]) -> None:
        """WatchUsers streams: a heartbeat first, then each change as it commits.

        From now: a user created meanwhile arrives as a change (and the first
        token becomes RESUME_TOKEN). Resumed: the changes after that token arrive.
        """
        process = await self._start(command)
        try:
            assert process.stdout is not None
            answers = _json_stream(process.stdout)
            first = await anext(answers)
            assert "heartbeat" in first, first
            assert first["resume_token"], first
            if "resume_token" not in request:
                self.values.setdefault("RESUME_TOKEN", first["resume_token"])
                async with grpc.aio.insecure_channel(self.address) as channel:
                    self.watched = await create_user(UserServiceStub(channel))
            assert self.watched is not None, "WatchUsers from now comes first"
            while "changes" not in (answer := await anext(answers)):
                pass
            (change,) = answer["changes"]["changes"]  # nothing else was written meanwhile
            assert change["kind"] == "KIND_CREATED", change
            assert change["user"]["id"] == self.watched.id, change
            assert answer["resume_token"]
            assert change["resume_token"]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
            await process.wait()

    def _refused_as_stale(self, asked: dict[str, Any], result: Result) -> bool:
        """A write with an etag the user no longer has fails ABORTED (ETAG_MISMATCH)."""
        etag = asked.get("etag", "")
        if not etag or etag == self.users[asked["id"]]["etag"]:
            return False
        assert result.code != 0, result.output
        assert re.search(r'code"?:\s*"?aborted\b', result.output, re.IGNORECASE), result.output
        assert "ETAG_MISMATCH" in result.output, result.output
        return True

    def _remember(self, user: dict[str, Any]) -> dict[str, Any]:
        self.users[user["id"]] = user
        return user


async def _json_stream(output: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a streaming grpcurl prints, one after another (each within the timeout)."""
    decoder, buffered = json.JSONDecoder(), ""
    while True:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            line = (await output.readline()).decode()
        assert line, f"the stream ended; it printed: {buffered}"
        buffered += line
        try:
            answer, end = decoder.raw_decode(buffered.strip())
        except json.JSONDecodeError:
            continue
        buffered = buffered.strip()[end:]
        yield snake(answer)


def _target(argv: list[str], address: str) -> str:
    """What a command asks for: `list`, `describe X`, `services`, or a method's path."""
    if argv[0] == "grpcurl":
        return " ".join(argv[argv.index(address) + 1 :])
    url = argv[-1].removeprefix(f"http://{address}")
    if "--list-services" in argv:
        return "services"
    if "--list-methods" in argv:
        return "methods"
    return url.lstrip("/")


def _request(argv: list[str]) -> dict[str, Any]:
    if "-d" not in argv:
        return {}
    request: dict[str, Any] = snake(json.loads(argv[argv.index("-d") + 1]))
    return request


def snake_name(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def snake(value: Any) -> Any:
    """JSON with proto field names, whichever spelling a tool printed or a command sent."""
    if isinstance(value, dict):
        return {snake_name(key): snake(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake(item) for item in value]
    return value


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of the documented commands: .venv/bin (grpcurl, buf) first on PATH."""
    path = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])
    return subprocess_env(PATH=path, **extra)


# --- the tests ----------------------------------------------------------------------------


def test_the_readme_has_every_kind_of_command_and_only_runnable_ones() -> None:
    commands = readme_commands()
    grpcurl = [c for c in commands if c.program == "grpcurl"]
    plaintext, tls = grpcurl_commands("-plaintext"), grpcurl_commands("-cacert")
    # Each grpcurl line is run by one of the tests below (plaintext, or TLS with
    # mTLS and a token); a line of another kind needs a test of its own here.
    assert {c.text for c in grpcurl} == {c.text for c in plaintext + tls}
    assert not {c.text for c in plaintext} & {c.text for c in tls}
    assert tls, "the TLS grpcurl block is gone"
    for command in tls:
        assert {"-cert", "-key", "-H"} <= set(command.argv), f"{command.page}: {command.text}"
    for command in grpcurl + bufcurl_commands():
        assert README_ADDRESS in command.text, f"{command.page}: {command.text}"
    # Every UserService RPC has a plaintext command, WatchUsers both from now and resumed.
    methods = {_target(c.argv, README_ADDRESS).rpartition("/")[2] for c in plaintext}
    service = descriptor_pool.Default().FindServiceByName("pat.users.v1.UserService")
    assert {method.name for method in service.methods} <= methods
    watches = [_request(c.argv) for c in plaintext if c.text.endswith("/WatchUsers")]
    assert watches, "the WatchUsers commands are gone"
    assert "resume_token" not in watches[0], "WatchUsers from now must come first"
    assert any("resume_token" in request for request in watches), "no resumed WatchUsers"
    assert bufcurl_commands(), "the buf curl block is gone"
    bufcurl_alias()


def test_grpcurl_is_the_version_the_readme_names() -> None:
    text = "\n".join(path.read_text() for path in pages())
    (named,) = set(re.findall(r"grpcurl (v\d+\.\d+\.\d+)", text))
    version = subprocess.run(
        [VENV_BIN / "grpcurl", "-version"], capture_output=True, text=True, timeout=10, check=True
    )
    assert (version.stdout + version.stderr).split() == ["grpcurl", named]


async def test_the_readme_grpcurl_commands_work_in_plaintext(
    database_url: str, tmp_path: Path
) -> None:
    async with serving(database_url) as running:
        address = f"127.0.0.1:{running.port}"
        session = Session(address, tmp_path, tool_env(), health_servicer=running.health.servicer)
        async with grpc.aio.insecure_channel(address) as channel:
            await wait_until_serving(channel)
            # Ten users older than the README's own: ListUsers has two pages, ID2 is one.
            others = [await create_user(UserServiceStub(channel)) for _ in range(10)]
        session.values["ID2"] = others[0].id
        for command in grpcurl_commands("-plaintext"):
            await session.run_and_check(command)
    assert session.checked == [c.text for c in grpcurl_commands("-plaintext")]


async def test_the_readme_buf_curl_commands_work(database_url: str) -> None:
    async with serving(database_url) as running:
        address = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await wait_until_serving(channel)
        # The alias names .venv/bin/buf relative to the checkout, as a reader's shell would.
        prefix = f"shopt -s expand_aliases\n{bufcurl_alias().text}\n"
        session = Session(address, PROJECT_ROOT, tool_env(), prefix=prefix)
        for command in bufcurl_commands():
            await session.run_and_check(command)
    assert len(session.checked) == len(bufcurl_commands())


@dataclass(frozen=True)
class TlsFolder:
    """What the documented TLS commands expect in their folder, and the server's side of it."""

    folder: Path
    server_settings: dict[str, object]


def tls_folder(root: Path) -> TlsFolder:
    """A CA, a server and a client certificate, and a callers file naming the client's token."""
    ca = CertificateAuthority(root / "ca")
    server, client = ca.server(), ca.client("readme-caller")
    folder = root / "client"
    folder.mkdir()
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    (folder / "client.pem").write_bytes(client.cert_pem)
    (folder / "client-key.pem").write_bytes(client.key_pem)
    tokens = root / "callers"
    tokens.write_text(f"readme-caller sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    return TlsFolder(
        folder,
        {
            "tls_cert_file": server.cert_file,
            "tls_key_file": server.key_file,
            "tls_client_ca_file": ca.cert_file,
            "auth_tokens_file": tokens,
        },
    )


async def test_the_readme_grpcurl_commands_work_with_tls_mtls_and_a_token(
    database_url: str, tmp_path: Path
) -> None:
    files = tls_folder(tmp_path)
    async with serving(database_url, **files.server_settings) as running:
        address = f"127.0.0.1:{running.port}"
        session = Session(address, files.folder, tool_env(TOKEN=TOKEN))
        commands = grpcurl_commands("-cacert")
        for command in commands:
            await session.run_and_check(command)
        # The token in the commands is what let them in: another one is refused.
        get_user = next(c for c in commands if c.text.endswith("UserService/GetUser"))
        refused = await session.run(get_user, TOKEN="not-" + TOKEN)
        assert refused.code != 0
        assert "Code: Unauthenticated" in refused.output, refused.output
    assert session.checked == [c.text for c in commands]
