"""glibc malloc settings that let the process give memory back after a flood.

Answers held for slow callers are large buffers freed at unpredictable
times, many by gRPC's own threads. With glibc's defaults each thread gets an
arena of its own and the mmap threshold grows after the first large free,
so such buffers end up inside heaps that are never returned: RSS stays at
its peak long after the flood. A fixed mmap threshold puts every large buffer
in its own mapping (returned at free), and a small arena count keeps the
rest compact. Small allocations (20,000 connections' worth) still leave
free holes inside the heap, which only malloc_trim hands back: `trim_forever`
calls it every TRIM_INTERVAL_SECONDS. Does nothing where glibc is not the C
library.
"""

import asyncio
import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_MMAP_THRESHOLD, 64 * 1024),  # 64 KiB and up: a mapping of its own
    (_M_TRIM_THRESHOLD, 1024 * 1024),  # give the heap's top back past 1 MiB free
    (_M_ARENA_MAX, 2),
)


TRIM_INTERVAL_SECONDS = 10.0


def _glibc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_memory_after_peaks() -> None:
    """Apply the settings above; call before threads start (gRPC's included)."""
    libc = _glibc()
    if libc is None:
        return
    for option, value in _SETTINGS:
        if libc.mallopt(option, value) != 1:
            logger.debug("mallopt(%d, %d) refused", option, value)


async def trim_forever() -> None:
    """Hand free heap pages back to the system every TRIM_INTERVAL_SECONDS."""
    libc = _glibc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(TRIM_INTERVAL_SECONDS)
        # A thread: trimming a large heap takes milliseconds (ctypes drops the GIL).
        await asyncio.to_thread(libc.malloc_trim, 0)
