"""`python -m service.probe`: a grpc_health_probe stand-in for containers.

Asks grpc.health.v1.Health/Check and exits 0 only when the answer is SERVING,
so Docker's HEALTHCHECK and compose's healthcheck need no extra binary.
"""

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    port = os.environ.get("GRPC_PORT", "50051")
    parser.add_argument("--addr", default=f"127.0.0.1:{port}", help="host:port of the server")
    parser.add_argument("--service", default="", help='service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a reply")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.addr) as channel:
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


if __name__ == "__main__":
    sys.exit(main())
