"""Loopback ports for the servers tests and benchmarks start."""

import socket


def free_port() -> int:
    """A loopback port nothing listens on now (free until someone else takes it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
