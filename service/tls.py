"""TLS and mTLS on GRPC_PORT, with certificates re-read when their files change.

TLS_CERT_FILE and TLS_KEY_FILE make the port TLS-only; TLS_CLIENT_CA_FILE
makes gRPC require, and verify, a client certificate signed by that CA.

Rotation needs no restart: grpcio's dynamic server credentials ask a fetcher
for a new certificate configuration before every TLS handshake. gRPC core
calls it on its own threads (not the event loop), holding the GIL, so it
only compares the files' stat() with what it last saw (microseconds), and
reads them again only when that changed: the kubelet swapping a mounted
Secret's symlink, cert-manager or an operator writing new files. New files
are checked (PEM parses, the key matches the certificate) before gRPC gets
them. Until they pass, gRPC keeps serving the previous certificate and the
log says why, once per change: a failed re-read never breaks a handshake.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


class TlsFilesError(ValueError):
    """The TLS files cannot be used: unreadable, not PEM, or a key that does not match."""


@dataclass(frozen=True)
class _Material:
    """What the files held, as read together."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None

    @property
    def fingerprint(self) -> str:
        """The leaf certificate's SHA-256, to tell in the log which one is served."""
        leaf = ssl.PEM_cert_to_DER_cert(_first_pem(self.cert_chain))
        return f"sha256:{hashlib.sha256(leaf).hexdigest()}"

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert_chain)], root_certificates=self.client_ca
        )


# A file's identity and version: device, inode (a swapped symlink's new target),
# size and modification time. None when the file cannot be stat'ed.
_Stat = tuple[int, int, int, int] | None


class CertificateFiles:
    """The server's certificate, key and client CA, read now and again when they change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = {"TLS_CERT_FILE": cert_file, "TLS_KEY_FILE": key_file}
        if client_ca_file is not None:
            self._files["TLS_CLIENT_CA_FILE"] = client_ca_file
        self._lock = threading.Lock()  # gRPC may call fetch() from several threads at once
        self._seen = self._stat()
        self.served = self._load()

    @property
    def requires_client_certificates(self) -> bool:
        return "TLS_CLIENT_CA_FILE" in self._files

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: a new configuration, or None to keep the served one."""
        try:
            with self._lock:
                return self._reload_if_changed()
        except Exception:  # never let a re-read break a handshake
            logger.exception("TLS files: re-reading failed; still serving the previous certificate")
            return None

    def _reload_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        seen = self._stat()
        if seen == self._seen:
            return None
        # Stat before reading: a write that lands during the read changes the stat again.
        self._seen = seen
        try:
            material = self._load()
        except TlsFilesError as error:
            logger.warning("TLS files changed, but %s: still serving the previous ones", error)
            return None
        if material == self.served:
            return None
        self.served = material
        logger.info("TLS files changed: now serving certificate %s", material.fingerprint)
        return material.configuration()

    def _stat(self) -> tuple[_Stat, ...]:
        return tuple(_stat(path) for path in self._files.values())

    def _load(self) -> _Material:
        """Read the files and check them; TlsFilesError says which one is wrong and how."""
        contents = {name: _read(name, path) for name, path in self._files.items()}
        _check(self._files, contents)
        return _Material(
            contents["TLS_CERT_FILE"], contents["TLS_KEY_FILE"], contents.get("TLS_CLIENT_CA_FILE")
        )


def add_port(server: grpc.aio.Server, address: str, files: CertificateFiles | None) -> int:
    """Bind `address`: TLS only with `files` (mTLS when they hold a client CA), else plaintext."""
    if files is None:
        return server.add_insecure_port(address)
    credentials = grpc.dynamic_ssl_server_credentials(
        files.served.configuration(),
        files.fetch,  # type: ignore[arg-type]  # the stub forgets None, "unchanged"
        require_client_authentication=files.requires_client_certificates,
    )
    port = server.add_secure_port(address, credentials)
    logger.info(
        "TLS on port %d: certificate %s%s",
        port,
        files.served.fingerprint,
        ", client certificates required" if files.requires_client_certificates else "",
    )
    return port


def _stat(path: Path) -> _Stat:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFilesError(f"{name} {path} cannot be read ({error.strerror})") from None


def _check(files: dict[str, Path], contents: dict[str, bytes]) -> None:
    """Let OpenSSL parse the files as gRPC will, and match the key to the certificate.

    The standard library's ssl loads certificates from paths only, so the files
    are read again afterwards: a change in between means they were being written.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_file, key_file = files["TLS_CERT_FILE"], files["TLS_KEY_FILE"]
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        raise TlsFilesError(
            f"TLS_CERT_FILE {cert_file} and TLS_KEY_FILE {key_file} are not a PEM certificate "
            f"and its private key ({error})"
        ) from None
    if ca := contents.get("TLS_CLIENT_CA_FILE"):
        try:
            context.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as error:
            raise TlsFilesError(
                f"TLS_CLIENT_CA_FILE {files['TLS_CLIENT_CA_FILE']} holds no PEM certificate "
                f"({error})"
            ) from None
    if any(_read(name, files[name]) != content for name, content in contents.items()):
        raise TlsFilesError("they changed while being read")


def _first_pem(chain: bytes) -> str:
    text = chain.decode("ascii", errors="replace")
    end = "-----END CERTIFICATE-----"
    return text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)]
