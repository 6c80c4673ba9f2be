"""One flood observed: the monitors on while it runs, its figures, and their table."""

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.floods.calls import FloodResult
from toolkit.floods.monitors import HealthWatch, RssMonitor, WellBehavedCaller
from toolkit.processes import tree_rss_mb


@dataclass
class Report:
    """One flood's figures: its own statuses and what the monitors saw meanwhile."""

    flood: str
    params: dict[str, Any]
    statuses: dict[str, Any]
    extra: dict[str, Any]
    flood_seconds: float
    rss_idle_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_timeline: list[tuple[float, float]]
    health_flips: int
    health_not_serving_s: float
    health_statuses: list[str]
    health_stream_errors: list[str]
    pool_renewed: bool
    # The server's ERROR lines during the flood (cleanup after cancelled calls included).
    server_errors: list[str]
    caller: dict[str, Any]


async def observe(
    name: str,
    flood: Callable[[], Awaitable[FloodResult]],
    *,
    address: str,
    pid: int,
    user_id: str,
    log: Sequence[str],
    params: dict[str, Any] | None = None,
    settle: float = 10.0,
    retry: bool = True,
) -> Report:
    """Run `flood` with every monitor on; RSS "after" is read `settle` s after it ends."""
    rss = RssMonitor(pid)
    health = HealthWatch(address)
    caller = WellBehavedCaller(address, user_id, retry=retry)
    log_start = len(log)
    monitors = [asyncio.create_task(m.run()) for m in (rss, health)]
    calling = asyncio.create_task(caller.run())
    try:
        await asyncio.sleep(1.0)
        rss_idle = statistics.median(mb for _, mb in rss.samples) if rss.samples else 0.0
        flood_start = time.monotonic()
        result = await flood()
        flood_end = time.monotonic()
        await asyncio.sleep(settle)
        rss_after = tree_rss_mb(pid) or 0.0
    finally:
        caller.stop()
        await asyncio.wait_for(calling, caller.deadline + 5)
        for monitor in monitors:
            monitor.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
    return Report(
        flood=name,
        params=params or {},
        statuses=result.statuses.as_dict(),
        extra=result.extra,
        flood_seconds=round(flood_end - flood_start, 1),
        rss_idle_mb=round(rss_idle, 1),
        rss_peak_mb=round(rss.peak(flood_start), 1),
        rss_after_mb=round(rss_after, 1),
        rss_timeline=rss.timeline(flood_start),
        health_flips=health.flips(),
        health_not_serving_s=round(health.not_serving_seconds(time.monotonic()), 1),
        health_statuses=health.statuses_seen(),
        health_stream_errors=health.stream_errors,
        pool_renewed=any("pool renewed" in line for line in list(log)[log_start:]),
        server_errors=[line for line in list(log)[log_start:] if " ERROR " in line],
        caller=caller.summary(),
    )


def format_report(report: Report) -> str:
    """The per-flood table the driver prints."""
    counts = report.statuses["counts"]
    caller = report.caller
    failures = ", ".join(f"{k} {v}" for k, v in caller["failures"].items()) or "none"
    rows = [
        f"== {report.flood} {json.dumps(report.params)} ==",
        ("flood statuses", ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"),
        (
            "slowest answer ms",
            ", ".join(f"{k} {v:.0f}" for k, v in report.statuses["slowest_ms"].items()) or "-",
        ),
        (
            "server RSS MiB",
            f"idle {report.rss_idle_mb:.0f}, peak {report.rss_peak_mb:.0f}, "
            f"after +settle {report.rss_after_mb:.0f} (flood ran {report.flood_seconds:.0f} s)",
        ),
        (
            'health ""',
            f"SERVING->NOT_SERVING flips {report.health_flips}, not serving "
            f"{report.health_not_serving_s:.1f} s, watch errors {len(report.health_stream_errors)}",
        ),
        ('"pool renewed"', "yes" if report.pool_renewed else "no"),
        ("server ERROR lines", str(len(report.server_errors))),
        (
            "well-behaved",
            f"{caller['calls']} calls, failures: {failures}, retries {caller['retries']}, "
            f"p50 {caller['p50_ms']:.0f} ms, p99 {caller['p99_ms']:.0f} ms, "
            f"worst {caller['worst_ms']:.0f} ms",
        ),
    ]
    rows += [(key, _short(value)) for key, value in report.extra.items() if "timeline" not in key]
    if report.extra.get("new_clients"):
        rows.append(("new clients", _short(report.extra["new_clients"]["timeline"])))
    return "\n".join(row if isinstance(row, str) else f"  {row[0]:<22}{row[1]}" for row in rows)


def _short(value: Any) -> str:
    text = (
        json.dumps({k: v for k, v in value.items() if k != "timeline"})
        if isinstance(value, dict)
        else json.dumps(value)
    )
    return text if len(text) <= 400 else text[:397] + "..."
