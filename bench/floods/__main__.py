"""The driver of `python -m bench.floods` (see bench/floods/__init__.py for what it does)."""

import os

# The embedded PostgreSQL forks pg_ctl while gRPC's threads run; gRPC's fork
# handlers can crash such children. This must precede importing grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import functools
import json
import sys
from pathlib import Path

import grpc

from bench.floods.arguments import flood_params, parse_args
from bench.floods.in_subprocess import SUBCOMMAND, flood_in_subprocess, run_here
from bench.floods.report import conditions, format_summary, write_json
from bench.servers import database
from toolkit.databases import migrate_to_head, seed_users
from toolkit.floods.observing import Report, format_report, observe
from toolkit.service_process import ServiceProcess, subprocess_env, wait_until_serving

# Every flood's server, before the settings given with --env.
SERVER_SETTINGS = {
    "GRPC_HOST": "127.0.0.1",
    "GRPC_PORT": "0",
    "SHUTDOWN_DRAIN_SECONDS": "0",
    "SHUTDOWN_GRACE_SECONDS": "2",
    "PAGE_TOKEN_SECRET": "floods",  # a throw-away server
}


async def start_server(args: argparse.Namespace, url: str, name: str) -> ServiceProcess:
    """`python -m service` from --server-root, serving; its log kept in --log-dir if given.

    It shares this process group: a Ctrl-C stops it too.
    """
    root = Path(args.server_root)
    settings = {**SERVER_SETTINGS, "DATABASE_URL": url}
    settings.update(item.split("=", 1) for item in args.env)
    server = await ServiceProcess.start(
        subprocess_env(root, **settings),
        cwd=root,
        log_path=Path(args.log_dir) / f"floods-{name}.log" if args.log_dir else None,
        own_process_group=False,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await wait_until_serving(channel, timeout=60)
    except BaseException:
        await asyncio.to_thread(server.stop)
        raise
    return server


async def run_floods(args: argparse.Namespace, url: str) -> list[Report]:
    """Each flood against a fresh server, watched; its table printed as it ends."""
    user_id = await seed_users(url, args.users)
    reports = []
    for name in args.floods:
        server = await start_server(args, url, name)
        try:
            params = flood_params(name, args)
            report = await observe(
                name,
                functools.partial(
                    flood_in_subprocess, name, server.address, user_id, server.pid, params
                ),
                address=server.address,
                pid=server.pid,
                user_id=user_id,
                log=server.log,
                params=params,
                settle=args.settle,
                retry=not args.no_retry,
            )
        finally:
            await asyncio.to_thread(server.stop)
        print(format_report(report), flush=True)
        reports.append(report)
    return reports


def main() -> None:
    if sys.argv[1:2] == [SUBCOMMAND]:
        asyncio.run(run_here(*json.loads(sys.argv[2])))
        return
    args = parse_args()
    run_conditions = conditions(args)
    print(
        f"# floods: {json.dumps({k: v for k, v in run_conditions.items() if k != 'args'})}",
        flush=True,
    )
    with database(prefix="pat-users-floods-") as url:
        migrate_to_head(url, checkout=Path(args.server_root))
        reports = asyncio.run(run_floods(args, url))
    print("\n" + format_summary(reports))
    if args.json:
        write_json(Path(args.json), run_conditions, reports)


if __name__ == "__main__":
    main()
