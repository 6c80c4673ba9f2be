"""Who is calling: bearer tokens listed in AUTH_TOKENS_FILE, or mTLS client certificates.

The file names one caller per line (`#` comments and blank lines allowed):

    NAME sha256:HEX [METHOD,METHOD,...] [weight=N]   a bearer token whose SHA-256 is HEX
    NAME x509 [METHOD,METHOD,...] [weight=N]         a client certificate whose identity is NAME

so it holds no secret. The optional list allows those UserService methods
only (PERMISSION_DENIED for the rest); without it, every method. `weight=N`
(1 to 100, default 1) gives the caller N times MAX_CONCURRENT_RPCS_PER_CALLER
(admission.py). A caller may have several token lines (to rotate its token
without a gap), all with the same weight.

A certificate's identity is its first DNS SAN, else its first URI SAN, else
its subject's CN; gRPC has already verified it against TLS_CLIENT_CA_FILE.
Without x509 lines, every such certificate is a caller named by its identity.
A sent `authorization` header takes precedence: a bad token is refused even
over a good certificate. Every failure is the same UNAUTHENTICATED, so the
answer never tells whether a caller exists.

The file is re-read, at most once a second, when its content changes; a
re-read that fails keeps the callers read before and logs an error.
"""

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pat.users.v1 import user_service_pb2
from service.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

USER_SERVICE_METHODS = frozenset(
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].methods_by_name
)
# How often, at most, the file is looked at for changes (on a call, never by a timer).
RELOAD_INTERVAL_SECONDS = 1.0

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_METHOD_NAME = re.compile(r"[A-Za-z]{1,40}")
_BEARER = "bearer "
_WEIGHT = "weight="
MAX_WEIGHT = 100
# A comment runs from a `#` at the start of a line or after a space to its end.
_COMMENT = re.compile(r"(?:^|\s)#.*")
# What goes into logs unescaped: printable ASCII without spaces.
_PLAIN = re.compile(r"[!-~]+")

Context = grpc.aio.ServicerContext[Any, Any]


class CallersFileError(ValueError):
    """AUTH_TOKENS_FILE cannot be used; the message names the line, never a hash."""


@dataclass(frozen=True)
class Caller:
    name: str
    methods: frozenset[str] | None  # None: every method
    weight: int = 1  # its share of calls in progress, in MAX_CONCURRENT_RPCS_PER_CALLER

    def authorize(self, method: str) -> None:
        """Raise PermissionDenied unless this caller may call `method`."""
        if self.methods is not None and method not in self.methods:
            raise PermissionDenied(self.name, method)


# Who calls when authentication is off (or has not succeeded yet).
ANONYMOUS = Caller("-", None)

# The caller of the UserService call this task serves: set by the guard once
# it has identified the caller (each call runs in a task of its own, with a
# context of its own), read where a call records who made it (the outbox).
_current_caller: ContextVar[Caller] = ContextVar("pat_users_caller", default=ANONYMOUS)


def calling_as(caller: Caller) -> None:
    """Make `caller` the current call's caller."""
    _current_caller.set(caller)


def current_actor() -> str:
    """The current call's caller's name; empty when authentication is off."""
    caller = _current_caller.get()
    return "" if caller is ANONYMOUS else caller.name


@dataclass(frozen=True)
class Callers:
    """The callers one version of the file lists."""

    tokens: tuple[tuple[bytes, Caller], ...] = ()  # (SHA-256 digest of the token, caller)
    certificates: Mapping[str, Caller] | None = None  # identity → caller; None: no x509 lines

    def __len__(self) -> int:
        return len(self.tokens) + len(self.certificates or {})


def read_callers(path: Path) -> Callers:
    """The callers `path` lists, or CallersFileError."""
    return parse_callers(_read(path), path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CallersFileError(f"{path}: cannot read it ({error.strerror})") from None


def parse_callers(content: bytes, path: Path) -> Callers:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise CallersFileError(f"{path}: not UTF-8 text") from None
    tokens: dict[bytes, tuple[int, Caller]] = {}
    certificates: dict[str, Caller] = {}
    weights: dict[str, tuple[int, int]] = {}  # name → (its weight, the line that set it)
    for number, line in enumerate(text.splitlines(), start=1):
        fields = _COMMENT.sub("", line).split()
        if not fields:
            continue
        try:
            name, credential, caller = _parse_line(fields)
        except ValueError as error:
            raise CallersFileError(f"{path}, line {number}: {error}") from None
        weight, first = weights.setdefault(name, (caller.weight, number))
        if weight != caller.weight:
            raise CallersFileError(
                f"{path}, line {number}: {name} has weight {caller.weight}, but {weight} on "
                f"line {first}"
            )
        if credential is None:
            if name in certificates:
                raise CallersFileError(f"{path}, line {number}: x509 caller {name} listed twice")
            certificates[name] = caller
        elif credential in tokens:
            first = tokens[credential][0]
            raise CallersFileError(f"{path}, line {number}: the same token hash as line {first}")
        else:
            tokens[credential] = (number, caller)
    return Callers(
        tuple((digest, caller) for digest, (_, caller) in tokens.items()),
        certificates or None,
    )


def _parse_line(fields: list[str]) -> tuple[str, bytes | None, Caller]:
    """(name, token digest or None for x509, caller) of one line's fields."""
    weights = [field for field in fields[2:] if field.startswith(_WEIGHT)]
    fields = fields[:2] + [field for field in fields[2:] if not field.startswith(_WEIGHT)]
    if len(fields) not in (2, 3) or len(weights) > 1:
        raise ValueError(
            "expected `NAME sha256:HEX [METHOD,...] [weight=N]` or `NAME x509 [METHOD,...] "
            "[weight=N]`"
        )
    name, credential = fields[0], fields[1]
    if not _PLAIN.fullmatch(name):
        raise ValueError("the name must be printable ASCII")
    digest = None
    if credential != "x509":
        scheme, _, hex_digest = credential.partition(":")
        if scheme != "sha256" or not _SHA256_HEX.fullmatch(hex_digest):
            raise ValueError("the credential must be `x509` or `sha256:` and 64 hex digits")
        digest = bytes.fromhex(hex_digest)
    methods = _parse_methods(fields[2]) if len(fields) == 3 else None
    weight = _parse_weight(weights[0]) if weights else 1
    return name, digest, Caller(name, methods, weight)


def _parse_weight(field: str) -> int:
    value = field.removeprefix(_WEIGHT)
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_WEIGHT):
        raise ValueError(f"weight must be a whole number from 1 to {MAX_WEIGHT}")
    return int(value)


def _parse_methods(field: str) -> frozenset[str]:
    methods = frozenset(field.split(","))
    unknown = methods - USER_SERVICE_METHODS
    if unknown:
        # Typos are named; anything else (a hash in the wrong column) is not.
        named = sorted(m for m in unknown if _METHOD_NAME.fullmatch(m))
        raise ValueError(f"not UserService methods: {', '.join(named) or 'see the list'}")
    return methods


class Authenticator:
    """Tells who calls, from a bearer token or (under mTLS) the client certificate."""

    def __init__(self, tokens_file: Path | None, certificates: bool) -> None:
        self._file = tokens_file
        self._certificates = certificates
        self._content = _read(tokens_file) if tokens_file else b""
        self._callers = parse_callers(self._content, tokens_file) if tokens_file else Callers()
        self._next_check = time.monotonic() + RELOAD_INTERVAL_SECONDS
        self._problem = ""
        if self._callers.certificates and not certificates:
            logger.warning("AUTH_TOKENS_FILE lists x509 callers, but TLS_CLIENT_CA_FILE is unset")

    def identify(self, context: Context) -> Caller:
        """Who calls, or Unauthenticated. Whether it may call the method is `authorize`'s."""
        if self._file is not None and time.monotonic() >= self._next_check:
            self._reload()
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self._token_caller(value)
        if self._certificates:
            return self._certificate_caller(context.auth_context())
        raise Unauthenticated()

    def _token_caller(self, header: str | bytes) -> Caller:
        if not isinstance(header, str) or header[: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated()
        token = header[len(_BEARER) :].strip()
        if not token:
            raise Unauthenticated()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        # Every line is compared, in constant time: how long a refusal takes
        # tells nothing about which tokens, or how many, the file holds.
        for expected, caller in self._callers.tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = caller
        if found is None:
            raise Unauthenticated()
        return found

    def _certificate_caller(self, auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
        identity = certificate_identity(auth_context)
        if identity is None:
            raise Unauthenticated()
        listed = self._callers.certificates
        if listed is None:
            return Caller(identity, None)
        caller = listed.get(identity)
        if caller is None:
            raise Unauthenticated()
        return caller

    def _reload(self) -> None:
        assert self._file is not None
        self._next_check = time.monotonic() + RELOAD_INTERVAL_SECONDS
        try:
            content = _read(self._file)
        except CallersFileError as error:
            self._complain(str(error))
            return
        if content == self._content:  # what the callers in use were read from
            self._problem = ""
            return
        try:
            callers = parse_callers(content, self._file)
        except CallersFileError as error:
            self._complain(str(error))
            return
        self._content, self._callers, self._problem = content, callers, ""
        logger.info("AUTH_TOKENS_FILE re-read: %d callers", len(callers))

    def _complain(self, problem: str) -> None:
        """Log a failed re-read once (not every second while the file stays so)."""
        if problem != self._problem:
            self._problem = problem
            logger.error("AUTH_TOKENS_FILE %s; keeping the callers read before", problem)


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The first DNS SAN, else URI SAN, else subject CN; escaped to printable ASCII."""
    for key in ("peer_dns", "peer_uri", "x509_common_name"):
        for value in auth_context.get(key, ()):
            return _plain(value.decode("utf-8", "replace"))
    return None


def _plain(text: str) -> str:
    """`text` with anything but printable, non-space ASCII as \\uXXXX: safe in a log line."""
    if _PLAIN.fullmatch(text):
        return text
    return "".join(c if "!" <= c <= "~" else f"\\u{ord(c):04x}" for c in text)


def new_authenticator(
    tokens_file: Path | None, client_ca_file: Path | None
) -> Authenticator | None:
    """An Authenticator when AUTH_TOKENS_FILE or mTLS is set; None: calls are anonymous."""
    if tokens_file is None and client_ca_file is None:
        return None
    return Authenticator(tokens_file, certificates=client_ca_file is not None)
