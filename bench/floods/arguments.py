"""The command line of `python -m bench.floods`: which floods, at what size, on which server."""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench.floods
from toolkit import PROJECT_ROOT

FLOODS = ("bad-masks", "list-flood", "never-read", "idle-conns")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floods",
        description=bench.floods.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "floods", nargs="*", help=f"which floods: {', '.join(FLOODS)} (default: all)"
    )
    parser.add_argument("--seconds", type=float, default=30, help="how long each flood runs")
    parser.add_argument(
        "--server-root", default=str(PROJECT_ROOT), help="checkout to run the server from"
    )
    parser.add_argument("--json", help="write every report as JSON to this path")
    parser.add_argument("--log-dir", help="keep each server's log here, as floods-NAME.log")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting"
    )
    parser.add_argument("--users", type=int, default=2000, help="users in the database")
    parser.add_argument(
        "--settle", type=float, default=10, help="seconds after a flood to read RSS"
    )
    parser.add_argument(
        "--no-retry", action="store_true", help="the well-behaved caller never retries"
    )
    parser.add_argument("--callers", type=int, default=20, help="bad-masks: concurrent callers")
    parser.add_argument("--paths", type=int, default=100_000, help="bad-masks: paths per mask")
    parser.add_argument(
        "--connections", type=int, default=200, help="list-flood, never-read: connections"
    )
    parser.add_argument(
        "--streams", type=int, default=100, help="list-flood, never-read: streams each"
    )
    parser.add_argument(
        "--page-size", type=int, default=0, help="never-read: ListUsers page size (default 1000)"
    )
    parser.add_argument(
        "--deadline", type=float, default=10, help="list-flood: deadline of each call"
    )
    parser.add_argument("--idle", type=int, default=20_000, help="idle-conns: connections")
    parser.add_argument("--idle-seconds", type=float, default=75, help="idle-conns: longest hold")
    args = parser.parse_args(argv)
    args.floods = args.floods or list(FLOODS)
    args.server_root = str(Path(args.server_root).resolve())
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if unknown := set(args.floods) - set(FLOODS):
        parser.error(f"no such flood: {', '.join(sorted(unknown))}")
    return args


def flood_params(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the flood named `name`, as the command line sized it."""
    if name == "bad-masks":
        return {"seconds": args.seconds, "callers": args.callers, "paths": args.paths}
    if name == "list-flood":
        return {
            "seconds": args.seconds,
            "connections": args.connections,
            "streams": args.streams,
            "deadline": args.deadline,
        }
    if name == "never-read":
        return {
            "seconds": args.seconds,
            "connections": args.connections,
            "streams": args.streams,
            **({"page_size": args.page_size} if args.page_size else {}),
        }
    return {"count": args.idle, "hold": args.idle_seconds}
