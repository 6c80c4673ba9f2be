"""Event-loop lag: how late the loop runs what is due, measured and logged.

Lag is how long every ready callback (every RPC, every health answer) waits
behind work hogging the loop. It is measured on its own and logged above a
threshold, not folded into database health: a busy process is not an outage.
"""

import asyncio
import logging
import time

logger = logging.getLogger(__name__)

# Ten samples a second: fine enough to see a stall, cheap enough to never matter.
SAMPLE_INTERVAL_SECONDS = 0.1
# At most one warning per window, so a long stall does not flood the log.
WARNING_WINDOW_SECONDS = 10.0


class LoopLag:
    """Samples the running loop's lag until `stop()`."""

    def __init__(self, warning_threshold: float) -> None:
        self.warning_threshold = warning_threshold
        self.last = 0.0  # seconds, the most recent sample
        self.worst = 0.0  # seconds, the worst sample since start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        last_warning = -WARNING_WINDOW_SECONDS
        while True:
            before = time.monotonic()
            await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)
            now = time.monotonic()
            self.last = max(0.0, now - before - SAMPLE_INTERVAL_SECONDS)
            self.worst = max(self.worst, self.last)
            if self.last > self.warning_threshold and now - last_warning >= WARNING_WINDOW_SECONDS:
                logger.warning(
                    "event loop lag %.0f ms: calls wait behind CPU-bound work (worst %.0f ms)",
                    self.last * 1000,
                    self.worst * 1000,
                )
                last_warning = now
