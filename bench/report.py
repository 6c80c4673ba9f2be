"""What `make bench` prints and writes: the runs table, the targets, the JSON file."""

import json
import math
import operator
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import Run

COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


@dataclass
class Target:
    """One figure of the issue's and its bound; `value` None means not measured."""

    name: str
    value: float | None
    op: str
    bound: float
    unit: str = ""
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "n/a"
        return "PASS" if COMPARE[self.op](self.value, self.bound) else "MISS"


@dataclass
class Report:
    """Everything one invocation measured, noted and skipped."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, run: Run) -> Run:
        if not self.runs:
            print_header()
        self.runs.append(run)
        print_run(run)
        return run

    def find(self, rpc: str, server: str) -> Run | None:
        return next((r for r in self.runs if r.rpc == rpc and r.server == server), None)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)

    @contextmanager
    def timed(self, section: str) -> Iterator[None]:
        """Note how long `section` took, in figures["section_seconds"]."""
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = self.figures.setdefault("section_seconds", {})
            seconds[section] = round(time.monotonic() - started, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "runs": [run.as_dict() for run in self.runs],
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.targets],
            "figures": self.figures,
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2, default=_plain) + "\n")


def _plain(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


HEADER = (
    f"{'RPC':<26}{'server':<18}{'client':<8}{'calls':>8}{'rps':>9}"
    f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  note"
)


def print_header() -> None:
    print(HEADER)
    print("-" * len(HEADER))


def print_run(run: Run) -> None:
    print(
        f"{run.rpc:<26}{run.server:<18}{run.client:<8}{run.calls:>8}{run.rps:>9.0f}"
        f"{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}{run.errors:>8}  {run.note}",
        flush=True,
    )


def print_targets(targets: list[Target]) -> None:
    """The measured targets; those whose runs were skipped are left out."""
    print()
    print(f"{'target':<50}{'value':>10}  {'bound':<12}{'':<6}detail")
    print("-" * 96)
    for t in targets:
        if t.verdict == "n/a":
            continue
        value = f"{t.value:.3f}" if isinstance(t.value, float) else str(t.value)
        bound = f"{t.op} {t.bound:g}{t.unit}"
        print(f"{t.name:<50}{value + t.unit:>10}  {bound:<12}{t.verdict:<6}{t.detail}")


def ratio(numerator: Run | None, denominator: Run | None) -> float | None:
    """numerator.rps / denominator.rps, or None when either was not measured."""
    if numerator is None or denominator is None or denominator.rps == 0:
        return None
    return numerator.rps / denominator.rps
