"""`python -m service.probe`: a grpc_health_probe stand-in for containers.

Asks grpc.health.v1.Health/Check and exits 0 only when the answer is SERVING,
so Docker's HEALTHCHECK and compose's healthcheck need no extra binary.

It reads the server's own settings from the environment, so the container's
HEALTHCHECK needs no arguments: it asks HEALTH_PORT when that is set (in
plaintext, as Kubernetes' probes do), else GRPC_PORT. The probe holds no
client certificate nor token, so with TLS on it needs HEALTH_PORT, and says so.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from service.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", help="host:port of the server (default: from the environment)")
    parser.add_argument("--service", default="", help='service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a reply")
    args = parser.parse_args(argv)
    address = args.addr or _address_from_settings()
    if address is None:
        return 1

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"health check failed: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _address_from_settings() -> str | None:
    """The plaintext port the server in this container answers health checks on.

    Settings read no file, so a certificate caught half-written during a
    rotation cannot fail the check of a server still serving the previous one.
    """
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"health check failed: configuration error: {error}", file=sys.stderr)
        return None
    if settings.health_port is not None:
        return f"127.0.0.1:{settings.health_port}"
    if settings.tls_cert_file is not None:
        print(
            "health check failed: GRPC_PORT speaks TLS only; set HEALTH_PORT for probes",
            file=sys.stderr,
        )
        return None
    return f"127.0.0.1:{settings.grpc_port}"


if __name__ == "__main__":
    sys.exit(main())
