"""Time in tests: waiting for a value to come, and stalling the event loop on purpose."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

# What `eventually` has seen before the probe first returned.
_NO_ANSWER = object()


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, within: float = 5.0
) -> None:
    """Poll `probe` until it returns `expected`; fail after `within` seconds with its last answer."""
    last: Any = _NO_ANSWER
    try:
        async with asyncio.timeout(within) as deadline:
            while (last := await probe()) != expected:  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.05)
    except TimeoutError:
        if not deadline.expired():
            raise  # the probe's own timeout, not ours
        seen = "no answer" if last is _NO_ANSWER else f"{last!r}"
        raise AssertionError(f"after {within:g} s: {seen}, expected {expected!r}") from None


def hog_the_loop(seconds: float) -> None:
    """CPU-bound work on the event loop, as a handler building a huge reply would do.

    An in-process server shares its event loop with the test: this stalls both.
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
