"""What a floods run reports beyond each flood's table: the conditions, a summary, the JSON."""

import argparse
import json
import os
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toolkit.floods.observing import Report


def conditions(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures depend on: the machine, its load, and which server ran."""
    root = Path(args.server_root).resolve()
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "server_root": str(root),
        "server_commit": commit,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
    }


def format_summary(reports: Sequence[Report]) -> str:
    """One row per flood, printed at the end of the run."""
    lines = [
        f"{'flood':<12}{'RSS idle/peak/after MiB':>25}{'flips':>7}{'renewed':>9}"
        f"{'caller fails':>14}{'p99/worst ms':>16}  flood statuses"
    ]
    for r in reports:
        rss = f"{r.rss_idle_mb:.0f}/{r.rss_peak_mb:.0f}/{r.rss_after_mb:.0f}"
        fails = f"{sum(r.caller['failures'].values())}/{r.caller['calls']}"
        tail = f"{r.caller['p99_ms']:.0f}/{r.caller['worst_ms']:.0f}"
        statuses = ", ".join(f"{k} {v}" for k, v in r.statuses["counts"].items())
        renewed = "yes" if r.pool_renewed else "no"
        lines.append(
            f"{r.flood:<12}{rss:>25}{r.health_flips:>7}{renewed:>9}{fails:>14}{tail:>16}"
            f"  {statuses}"
        )
    return "\n".join(lines)


def write_json(path: Path, conditions: dict[str, Any], reports: Sequence[Report]) -> None:
    """Every report, with the conditions they were measured under."""
    path.write_text(
        json.dumps({"conditions": conditions, "reports": [asdict(r) for r in reports]}, indent=1)
    )
