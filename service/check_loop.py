"""An event loop on a thread of its own, for background checks of a database.

When RPCs keep the server's event loop busy, a check run there would time
out waiting behind them, and report the database slow when the server is.
Run on a loop of its own, a check's timeout measures the database alone
(loop_lag.py measures the server's own backlog).
"""

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class CheckLoop:
    """An event loop of its own on a daemon thread, where the checks run."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` there; cancelling the caller cancels it too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
