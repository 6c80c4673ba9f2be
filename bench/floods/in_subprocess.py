"""Each flood in a process of its own, its result sent back as one JSON line.

Thousands of calls in flight lag the event loop that drives them; sharing it
would make the monitors (the well-behaved caller above all) report the flood
client's lag as the server's.
"""

import asyncio
import json
import resource
import sys
from collections.abc import Awaitable
from typing import Any

from toolkit import PROJECT_ROOT
from toolkit.floods.bad_masks import bad_masks
from toolkit.floods.calls import FloodResult
from toolkit.floods.idle_conns import idle_conns
from toolkit.floods.list_flood import list_flood
from toolkit.floods.never_read import never_read
from toolkit.floods.statuses import Statuses

# The hidden subcommand of `python -m bench.floods` that runs one flood here.
SUBCOMMAND = "_flood"


def start_flood(
    name: str, address: str, user_id: str, pid: int, params: dict[str, Any]
) -> Awaitable[FloodResult]:
    """The flood named `name`, sized by `params`, against the server at `address` (`pid`)."""
    if name == "bad-masks":
        return bad_masks(address, user_id, **params)
    if name == "list-flood":
        return list_flood(address, **params)
    if name == "never-read":
        return never_read(address, **params)
    return idle_conns(address, user_id, pid=pid, **params)


async def flood_in_subprocess(
    name: str, address: str, user_id: str, pid: int, params: dict[str, Any]
) -> FloodResult:
    """Run the flood named `name` in a process of its own; what its callers saw."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floods",
        SUBCOMMAND,
        json.dumps([name, address, user_id, pid, params]),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the {name} flood failed (exit code {process.returncode})")
    data = json.loads(output.splitlines()[-1])
    return FloodResult(Statuses.from_dict(data["statuses"]), data["extra"])


async def run_here(name: str, address: str, user_id: str, pid: int, params: Any) -> None:
    """In the flood's own process: run it, print its result as one JSON line."""
    result = await start_flood(name, address, user_id, pid, params)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.extra["client_peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    result.extra["client_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    print(json.dumps({"statuses": result.statuses.as_dict(), "extra": result.extra}))
