"""Fuzzing: generated requests to every UserService RPC, on the real server and database.

Each hypothesis example starts from the same few users (made through the API),
then sends a short script of calls: one at a time, or a few at once. The calls
mix valid values (ids and etags of users this example has seen, emails from a
small pool so that they collide, page tokens the server issued) with hostile
ones (any Unicode, control characters, very long strings, mangled UUIDs, huge
repeated fields, junk masks, forged page tokens, extreme page sizes) and with
raw bytes as the whole payload. Properties:

- every status is one the contract allows for that RPC (ALLOWED below): never
  INTERNAL, UNKNOWN, CANCELLED, UNAVAILABLE or DEADLINE_EXCEEDED, since the
  database is up and the load is tiny; RESOURCE_EXHAUSTED only for a request
  over the server's 64 KiB limit (strategies stay under it but for rare
  combinations of long fields);
- every successful write (UpdateUser, DeleteUser, UndeleteUser) answers with
  an etag that the user never had before (were it an earlier one, a write
  conditioned on that stale etag could succeed), for the user it was asked
  for and in the state it asked for;
- no two live users hold the same email, in any letter case (SQL, after
  every example);
- after the run the server is still up: Health/Check("") is SERVING.

How hypothesis is driven: the fixtures' server and channel live on the session
event loop, which also runs this (async) test, and hypothesis only drives
synchronous functions. So the test hands a synchronous @given function to a
worker thread (asyncio.to_thread); each example submits its coroutine back to
the session loop with run_coroutine_threadsafe and blocks that worker thread,
not the loop, until the calls are done.

`make test` runs a bounded profile; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) a
long one that keeps failing examples in .pytest_cache/hypothesis for replay.
"""

import asyncio
import base64
import json
import os
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from tests.support import PROJECT_ROOT, USER_SERVICE_RPCS, asyncpg_dsn

# --- Settings ----------------------------------------------------------------

settings.register_profile(
    "bounded",
    # About 5 calls an example over 9 strategies (8 RPCs and raw bytes): some
    # 150 calls per strategy, in about 10 s on a shared 2-core machine.
    max_examples=300,
    deadline=None,  # an example is a few network round trips: its time varies
    database=None,  # nothing written next to the repo by `make test`
    print_blob=True,  # a failure prints how to reproduce it exactly
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    settings.get_profile("bounded"),
    max_examples=5_000,
    database=DirectoryBasedExampleDatabase(PROJECT_ROOT / ".pytest_cache" / "hypothesis"),
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "bounded")

# --- What may come back ------------------------------------------------------

C = grpc.StatusCode
_READ = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}
# Per RPC, the codes of the contract (API.md, user_service.proto). ABORTED on
# writes also covers a deadlock or serialization failure between concurrent calls.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "CreateUser": {C.OK, C.INVALID_ARGUMENT, C.ALREADY_EXISTS, C.ABORTED},
    "GetUser": _READ,
    "BatchGetUsers": _READ,
    "LookupUser": _READ,
    "ListUsers": {C.OK, C.INVALID_ARGUMENT},
    "UpdateUser": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.ABORTED},
    "DeleteUser": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ABORTED},
    "UndeleteUser": {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.ALREADY_EXISTS,
        C.ABORTED,
        C.FAILED_PRECONDITION,
    },
}
assert set(ALLOWED) == set(USER_SERVICE_RPCS)
WRITES = {"UpdateUser", "DeleteUser", "UndeleteUser"}
MAX_REQUEST_BYTES = 64 * 1024
CALL_TIMEOUT = 10  # seconds; a call that takes longer is a hang, and fails the example
RESPONSES: dict[str, type[Message]] = {rpc: getattr(pb, f"{rpc}Response") for rpc in ALLOWED}

# --- Placeholders ------------------------------------------------------------

# Strategies cannot know the ids and etags the server will assign, so requests
# carry placeholders in their string fields, replaced just before the call:
# "{user:2}" is the id of the third user this example has seen (modulo how many
# it has seen), "{etag:2}" that user's latest etag, "{stale-etag:2}" its first,
# "{page-token:0}" the first next_page_token ListUsers returned (left as it is,
# and so invalid, while there is none). A "|mangle" suffix alters the value.
# Requests stay plain messages: strategies stay pure and a falsifying example
# reads as the request that was sent.
_PLACEHOLDER = re.compile(r"\{(user|etag|stale-etag|page-token):(\d+)(?:\|([a-z-]+))?\}")

MANGLES: dict[str, Callable[[str], str]] = {
    "upper": str.upper,  # upper-case hex is a valid id
    "braces": lambda s: "{" + s + "}",
    "urn": lambda s: "urn:uuid:" + s,
    "no-hyphens": lambda s: s.replace("-", ""),
    "drop-last": lambda s: s[:-1],
    "flip-last": lambda s: s[:-1] + ("B" if s.endswith("A") else "A"),
    "space": lambda s: " " + s,
    "double": lambda s: s + s,
    "arabic-digits": lambda s: s.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")),
}


@dataclass
class Seen:
    """What one example has learnt from the server's answers."""

    ids: list[str] = field(default_factory=list)  # in order of first sight
    etags: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # oldest first
    page_tokens: list[str] = field(default_factory=list)

    def observe(self, reply: Message) -> None:
        for user in _users_in(reply):
            if user.id not in self.etags:
                self.ids.append(user.id)
            if user.etag not in self.etags[user.id]:
                self.etags[user.id].append(user.etag)
        if isinstance(reply, pb.ListUsersResponse) and reply.next_page_token:
            self.page_tokens.append(reply.next_page_token)

    def resolve(self, value: str) -> str:
        match = _PLACEHOLDER.fullmatch(value)
        if match is None:
            return value
        kind, index, mangle = match[1], int(match[2]), match[3]
        if kind == "page-token":
            if not self.page_tokens:
                return value
            resolved = self.page_tokens[index % len(self.page_tokens)]
        else:
            user_id = self.ids[index % len(self.ids)]
            resolved = {
                "user": user_id,
                "etag": self.etags[user_id][-1],
                "stale-etag": self.etags[user_id][0],
            }[kind]
        return MANGLES[mangle](resolved) if mangle else resolved

    def resolve_message(self, message: Message) -> None:
        """Replace placeholders in every string field of `message`, in place."""
        for descriptor, value in message.ListFields():
            if descriptor.type == descriptor.TYPE_STRING:
                if descriptor.is_repeated:
                    value[:] = [self.resolve(item) for item in value]
                else:
                    setattr(message, descriptor.name, self.resolve(value))
            elif descriptor.type == descriptor.TYPE_MESSAGE:
                for child in value if descriptor.is_repeated else [value]:
                    self.resolve_message(child)


def _users_in(reply: Message) -> list[user_pb2.User]:
    if isinstance(reply, pb.BatchGetUsersResponse | pb.ListUsersResponse):
        return list(reply.users)
    return [reply.user]  # type: ignore[attr-defined]


# --- Strategies --------------------------------------------------------------

# Each field has a valid strategy and an `any_` one that adds hostile values.
# Every RPC draws either a request of valid fields only (to reach the database
# and the write paths) or one of any fields: with three hostile-prone fields, a
# request of `any_` fields alone would almost never get past validation.

# Distinct emails, some equal but for letter case, so that creates, updates and
# undeletes collide.
EMAIL_POOL = [
    "ann@example.com",
    "Ann@Example.COM",
    "bob@example.com",
    "BOB@example.com",
    "cy@example.org",
    "dee@example.net",
    "o'brien@example.com",
    "ünïcødé@exämple.de",
]
NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b@example.com",
    "x'); DROP TABLE users; --",
    "%s%s%n",
    "\u202eevil",
    "Zoë 李 🚀",
    "\ufeffann@example.com",
    "ann@example.com\n",
    "null",
    "-1",
    "9" * 30,
]
REQUEST_IDS = [str(uuid.UUID(int=n)) for n in (1, 2, 3)]  # few, so that retries happen
KNOWN = st.integers(0, 7)  # which seen user a placeholder names
LONG_FIELD_BYTES = 20_000  # three such fields in one request stay under 64 KiB
REPEATED_FIELD_BYTES = 60_000  # a huge repeated field stays under 64 KiB too


def _repeat_to_bytes(unit: str, size: int) -> str:
    """`unit` repeated to about `size` UTF-8 bytes (at least once)."""
    return unit * max(1, size // len(unit.encode()))


def short_hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),  # any Unicode but surrogates, which UTF-8 cannot carry
        st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]), max_size=12),
        st.sampled_from(NASTY),
    )


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        short_hostile_text(),
        # Very long: built by repetition, as drawing 20 000 characters one by one
        # is slow and overruns hypothesis's input buffer.
        st.builds(
            _repeat_to_bytes, st.text(min_size=1, max_size=4), st.integers(1, LONG_FIELD_BYTES)
        ),
        # Lengths around the limits: display_name 200, email 254 (in code points).
        st.builds(
            lambda unit, n: unit * n, st.sampled_from(["a", "é", "🚀"]), st.integers(199, 256)
        ),
    )


def _email_of_length(n: int) -> str:
    """A syntactically valid address of `n` characters (254 is the limit)."""
    return f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * (n - 197)}.com"


def valid_emails() -> st.SearchStrategy[str]:
    pool = st.sampled_from(EMAIL_POOL)
    return st.one_of(
        pool, pool, pool.map(str.swapcase), st.emails(), st.just(_email_of_length(254))
    )


def any_emails() -> st.SearchStrategy[str]:
    return st.one_of(valid_emails(), st.just(_email_of_length(255)), hostile_text())


def valid_display_names() -> st.SearchStrategy[str]:
    printable = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=200)
    return st.one_of(st.just(""), st.sampled_from(["Ann", "Bob"]), printable)


def any_display_names() -> st.SearchStrategy[str]:
    return st.one_of(valid_display_names(), hostile_text())


def placeholder(kind: str, mangled: bool = False) -> st.SearchStrategy[str]:
    if not mangled:
        return st.builds(lambda i: f"{{{kind}:{i}}}", KNOWN)
    mangles = st.sampled_from(sorted(MANGLES))
    return st.builds(lambda i, m: f"{{{kind}:{i}|{m}}}", KNOWN, mangles)


def uuidish() -> st.SearchStrategy[str]:
    """Well-formed unknown UUIDs, the nil UUID, and UUIDs almost in canonical form."""
    text = st.uuids().map(str)
    return st.one_of(
        text,
        st.just(str(uuid.UUID(int=0))),
        st.builds(lambda s, m: MANGLES[m](s), text, st.sampled_from(sorted(MANGLES))),
    )


def valid_user_ids() -> st.SearchStrategy[str]:
    return placeholder("user")


def any_user_ids(long: bool = True) -> st.SearchStrategy[str]:
    hostile = hostile_text() if long else short_hostile_text()
    return st.one_of(valid_user_ids(), placeholder("user", mangled=True), uuidish(), hostile)


def valid_etags() -> st.SearchStrategy[str]:
    current = placeholder("etag")
    return st.one_of(st.just(""), current, current, placeholder("stale-etag"))


def any_etags() -> st.SearchStrategy[str]:
    return st.one_of(
        valid_etags(),
        placeholder("etag", mangled=True),
        st.integers(-(2**64), 2**64).map(str),
        hostile_text(),
    )


def _repeat_list(few: list[str], n: int) -> list[str]:
    # Capped so that the field stays under REPEATED_FIELD_BYTES: each item costs
    # its UTF-8 length plus a tag and a length prefix (at most 3 bytes here).
    cycle = sum(len(item.encode()) + 3 for item in few)
    n = min(n, REPEATED_FIELD_BYTES * len(few) // cycle)
    return (few * n)[:n]


def repeated(items: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[list[str]]:
    """A few items, or up to `max_size`: a few drawn ones, repeated (cheap to generate)."""
    few = st.lists(items, min_size=1, max_size=4)
    return st.one_of(
        st.lists(items, max_size=6), st.builds(_repeat_list, few, st.integers(0, max_size))
    )


VALID_MASKS = [[], ["email"], ["display_name"], ["*"], ["email", "display_name"]]
MASK_PATHS = ["email", "display_name", "*", "id", "etag", "create_time", "delete_time"]
MASK_PATHS += ["user.email", "Email", "display_name ", "email,display_name", ""]


def valid_masks() -> st.SearchStrategy[field_mask_pb2.FieldMask | None]:
    paths = st.sampled_from(VALID_MASKS).map(lambda p: field_mask_pb2.FieldMask(paths=p))
    return st.one_of(st.none(), paths)


def any_masks() -> st.SearchStrategy[field_mask_pb2.FieldMask | None]:
    paths = repeated(st.one_of(st.sampled_from(MASK_PATHS), short_hostile_text()), 1500)
    return st.one_of(valid_masks(), paths.map(lambda p: field_mask_pb2.FieldMask(paths=p)))


def any_page_tokens() -> st.SearchStrategy[str]:
    b64 = st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode())
    # Shaped like the real ones (itsdangerous: base64 JSON "." signature), unsigned.
    forged_payload = st.builds(
        lambda t, i, d: json.dumps([t, i, d]),
        st.datetimes().map(lambda t: t.isoformat()),
        st.uuids().map(str),
        st.booleans(),
    ).map(lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="))
    forged = st.builds(lambda payload, sig: f"{payload}.{sig}", forged_payload, b64)
    return st.one_of(
        st.just(""),
        placeholder("page-token"),
        placeholder("page-token", mangled=True),
        b64,
        forged,
        hostile_text(),
    )


def page_sizes() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 1000, 1001, -1]), st.integers(-(2**31), 2**31 - 1)
    )


def valid_or_any(
    build: Callable[..., Message], **fields: tuple[Any, Any]
) -> st.SearchStrategy[Message]:
    """`build` from the valid strategy of every field, or from the `any_` one of every field."""
    valid = st.builds(build, **{name: pair[0] for name, pair in fields.items()})
    anything = st.builds(build, **{name: pair[1] for name, pair in fields.items()})
    return st.one_of(valid, anything)


def _user(**fields: Any) -> user_pb2.User:
    return user_pb2.User(**fields)


def _update_request(
    user: user_pb2.User, update_mask: field_mask_pb2.FieldMask | None
) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(user=user, update_mask=update_mask)


NEW_USERS = valid_or_any(
    _user,
    email=(valid_emails(), any_emails()),
    display_name=(valid_display_names(), any_display_names()),
    # Output only: ignored on create; set now and then, never valid.
    id=(st.just(""), st.one_of(st.just(""), any_user_ids())),
    etag=(st.just(""), st.one_of(st.just(""), any_etags())),
)
CHANGED_USERS = valid_or_any(
    _user,
    id=(valid_user_ids(), any_user_ids()),
    email=(st.one_of(st.just(""), valid_emails()), any_emails()),
    display_name=(valid_display_names(), any_display_names()),
    etag=(valid_etags(), any_etags()),
)
REQUEST_ID = (st.one_of(st.just(""), st.sampled_from(REQUEST_IDS)), any_user_ids())
ID_AND_ETAG = {"id": (valid_user_ids(), any_user_ids()), "etag": (valid_etags(), any_etags())}

REQUESTS: dict[str, st.SearchStrategy[Message]] = {
    "CreateUser": st.one_of(
        st.builds(pb.CreateUserRequest, user=NEW_USERS, request_id=REQUEST_ID[0]),
        st.builds(
            pb.CreateUserRequest, user=st.one_of(st.none(), NEW_USERS), request_id=REQUEST_ID[1]
        ),
    ),
    "GetUser": valid_or_any(pb.GetUserRequest, id=(valid_user_ids(), any_user_ids())),
    "BatchGetUsers": valid_or_any(
        pb.BatchGetUsersRequest,
        ids=(repeated(valid_user_ids(), 1000), repeated(any_user_ids(long=False), 1500)),
    ),
    "LookupUser": valid_or_any(pb.LookupUserRequest, email=(valid_emails(), any_emails())),
    "ListUsers": valid_or_any(
        pb.ListUsersRequest,
        page_size=(st.integers(0, 5), page_sizes()),
        page_token=(st.sampled_from(["", "{page-token:0}", "{page-token:1}"]), any_page_tokens()),
        show_deleted=(st.booleans(), st.booleans()),
    ),
    "UpdateUser": st.one_of(
        st.builds(_update_request, CHANGED_USERS, valid_masks()),
        st.builds(_update_request, CHANGED_USERS, any_masks()),
    ),
    "DeleteUser": valid_or_any(pb.DeleteUserRequest, **ID_AND_ETAG),
    "UndeleteUser": valid_or_any(pb.UndeleteUserRequest, **ID_AND_ETAG),
}
assert set(REQUESTS) == set(ALLOWED)


@dataclass(frozen=True)
class Call:
    """One RPC to make. `request` is a message (placeholders resolved when sent) or
    raw bytes sent as the whole payload; `garble` overwrites bytes of the
    serialized message at an offset (modulo its length)."""

    rpc: str
    request: Message | bytes
    garble: tuple[int, bytes] | None = None

    @property
    def raw(self) -> bool:
        return isinstance(self.request, bytes) or self.garble is not None

    def __repr__(self) -> str:
        if isinstance(self.request, bytes):
            return f"Call({self.rpc}, raw={self.request!r})"
        fields = text_format.MessageToString(self.request, as_one_line=True, as_utf8=True)
        garbled = f", garble={self.garble!r}" if self.garble else ""
        return f"Call({self.rpc}, {type(self.request).__name__}<{fields}>{garbled})"

    def payload(self, seen: Seen) -> bytes:
        if isinstance(self.request, bytes):
            return self.request
        message = type(self.request)()
        message.CopyFrom(self.request)
        seen.resolve_message(message)
        data = message.SerializeToString()
        if self.garble is not None:
            offset, junk = self.garble
            offset %= len(data) + 1
            data = data[:offset] + junk + data[offset + len(junk) :]
        return data


def raw_calls() -> st.SearchStrategy[Call]:
    rpcs = st.sampled_from(USER_SERVICE_RPCS)
    random_bytes = st.builds(Call, rpcs, st.binary(max_size=300))
    garbled = st.sampled_from(USER_SERVICE_RPCS).flatmap(
        lambda rpc: st.builds(
            Call,
            st.just(rpc),
            REQUESTS[rpc],
            st.tuples(st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
        )
    )
    return st.one_of(random_bytes, garbled)


CALLS = st.one_of(
    *(st.builds(Call, st.just(rpc), request) for rpc, request in REQUESTS.items()),
    raw_calls(),
)
# A script: steps run one after the other; a step of several calls runs them at once.
SCRIPTS = st.lists(
    st.one_of(st.lists(CALLS, min_size=1, max_size=1), st.lists(CALLS, min_size=2, max_size=3)),
    min_size=1,
    max_size=8,
)

# Pinned and run first every time: extremes that generation reaches only now and then.
EXTREMES: list[list[list[Call]]] = [
    [[Call("BatchGetUsers", pb.BatchGetUsersRequest(ids=["{user:0}"] * 1000))]],
    # 1000 field violations: the error must still fit a client's metadata limit.
    [[Call("BatchGetUsers", pb.BatchGetUsersRequest(ids=["{user:1|braces}"] * 1000))]],
    [
        [
            Call(
                "BatchGetUsers",
                pb.BatchGetUsersRequest(ids=[str(uuid.UUID(int=n)) for n in range(1500)]),
            )
        ]
    ],
    [
        [
            Call(
                "UpdateUser",
                pb.UpdateUserRequest(
                    user=user_pb2.User(id="{user:0}", email="ann@example.com"),
                    update_mask=field_mask_pb2.FieldMask(paths=["emails"] * 1500),
                ),
            )
        ]
    ],
]

# --- Running a script --------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str
    reply: Message | None


class Fuzzer:
    def __init__(self, channel: grpc.aio.Channel, database: asyncpg.Connection) -> None:
        self._database = database
        self._methods = {
            rpc: channel.unary_unary(
                f"/pat.users.v1.UserService/{rpc}",
                request_serializer=None,
                response_deserializer=None,
            )
            for rpc in USER_SERVICE_RPCS
        }

    async def run(self, script: list[list[Call]]) -> list[str]:
        """Run the script on a fresh table; return what happened, for statistics."""
        seen = await self._start_over()
        events: list[str] = []
        for step in script:
            events += await self._run_step(seen, step)
        await self.assert_no_email_held_twice()
        return events

    async def _start_over(self) -> Seen:
        """Empty the table, then the same four users as every example, via the API.

        ann (live); bob (deleted) and BOB (live), so undeleting bob collides;
        cy (deleted), free to undelete.
        """
        await self._database.execute("DELETE FROM users")
        seen = Seen()

        async def ok(rpc: str, request: Message) -> Message:
            outcome = await self._send(rpc, request.SerializeToString())
            assert outcome.reply is not None, outcome
            return outcome.reply

        def create(email: str) -> Coroutine[Any, Any, Message]:
            return ok("CreateUser", pb.CreateUserRequest(user=user_pb2.User(email=email)))

        def delete(reply: Any) -> Coroutine[Any, Any, Message]:
            return ok("DeleteUser", pb.DeleteUserRequest(id=reply.user.id))

        ann, bob, cy = await asyncio.gather(
            create("ann@example.com"), create("bob@example.com"), create("cy@example.org")
        )
        for reply in (ann, bob, cy, *await asyncio.gather(delete(bob), delete(cy))):
            seen.observe(reply)
        seen.observe(await create("BOB@example.com"))
        return seen

    async def _send(self, rpc: str, payload: bytes) -> Outcome:
        try:
            data = await self._methods[rpc](payload, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "", None)
        return Outcome(C.OK, "", RESPONSES[rpc].FromString(data))

    async def _run_step(self, seen: Seen, step: list[Call]) -> list[str]:
        # Placeholders resolve against what was seen before the step, and etags
        # are compared with those: concurrent calls see no particular order.
        payloads = [call.payload(seen) for call in step]
        etags_before = {user_id: set(etags) for user_id, etags in seen.etags.items()}
        outcomes = await asyncio.gather(
            *(self._send(call.rpc, payload) for call, payload in zip(step, payloads, strict=True))
        )
        written: dict[str, list[str]] = defaultdict(list)
        events = []
        for call, payload, outcome in zip(step, payloads, outcomes, strict=True):
            allowed = ALLOWED[call.rpc]
            if len(payload) > MAX_REQUEST_BYTES:
                allowed = allowed | {C.RESOURCE_EXHAUSTED}
            assert outcome.code in allowed, (
                f"{call.rpc} answered {outcome.code.name} ({outcome.message!r}) "
                f"to {len(payload)} bytes: {payload[:2000]!r}"
            )
            # Tallied and printed at the end (`make fuzz` shows it): what the run reached.
            events.append(f"{call.rpc}{' (raw)' if call.raw else ''}: {outcome.code.name}")
            if outcome.reply is None:
                continue
            seen.observe(outcome.reply)
            if call.rpc in WRITES:
                user = outcome.reply.user  # type: ignore[attr-defined]
                _assert_write_answer(call.rpc, payload, user)
                written[user.id].append(user.etag)
        for user_id, new_etags in written.items():
            assert not set(new_etags) & etags_before.get(user_id, set()), (
                f"a write to {user_id} answered an etag it had before: "
                f"{new_etags} vs {etags_before[user_id]}"
            )
            assert len(set(new_etags)) == len(new_etags), f"two writes, one etag: {new_etags}"
        return events

    async def assert_no_email_held_twice(self) -> None:
        held_twice = await self._database.fetch(
            "SELECT lower(email) AS email, count(*) AS n FROM users "
            "WHERE delete_time IS NULL GROUP BY lower(email) HAVING count(*) > 1"
        )
        assert not held_twice, f"live users share an email: {[tuple(r) for r in held_twice]}"


def _assert_write_answer(rpc: str, payload: bytes, user: user_pb2.User) -> None:
    """A successful write answers with the user it was asked for, in the state asked for."""
    request: Any = getattr(pb, f"{rpc}Request").FromString(payload)
    asked_id = request.user.id if rpc == "UpdateUser" else request.id
    assert user.id == asked_id.lower(), f"{rpc} for {asked_id} answered user {user.id}"
    assert user.HasField("delete_time") == (rpc == "DeleteUser"), f"{rpc} answered {user}"


def _with_examples(scripts: list[list[list[Call]]]) -> Callable[[Any], Any]:
    def decorate(test: Any) -> Any:
        for script in reversed(scripts):
            test = example(script=script)(test)
        return test

    return decorate


# --- The test ----------------------------------------------------------------


@pytest.mark.timeout(0 if PROFILE == "fuzz" else 120)  # a long run is meant to be long
async def test_fuzz_every_rpc(channel: grpc.aio.Channel, database_url: str) -> None:
    loop = asyncio.get_running_loop()
    database = await asyncpg.connect(asyncpg_dsn(database_url))
    fuzzer = Fuzzer(channel, database)
    tally: Counter[str] = Counter()

    @settings(settings.get_profile(PROFILE))
    @given(script=SCRIPTS)
    @_with_examples(EXTREMES)
    def run_script(script: list[list[Call]]) -> None:
        # This thread waits; the session loop runs the calls (and the server).
        tally.update(asyncio.run_coroutine_threadsafe(fuzzer.run(script), loop).result())
        tally["examples"] += 1

    try:
        await asyncio.to_thread(run_script)
        await fuzzer.assert_no_email_held_twice()
    finally:
        await database.close()
        print(f"fuzz statistics, {PROFILE} profile:")
        for name, count in sorted(tally.items()):
            print(f"{count:8} {name}")
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
