"""What tests/ and bench/ share: launching servers, reading processes, databases, floods.

Both run the service as operators do (`python -m service` as a child
process, PostgreSQL, PgBouncer) and watch it from outside; this package is
the one place that knows how, so that a test and the benchmark measuring the
same thing cannot drift apart. It is a development tool, not part of the
service: the wheel ships only `service` and `pat` (pyproject.toml), and the
image copies neither tests/, bench/ nor this.
"""

from pathlib import Path

# The checkout this toolkit belongs to: where `python -m service` runs by default.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
