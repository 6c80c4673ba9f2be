"""glibc malloc settings that let the process give memory back after a flood.

Answers held for slow callers are large buffers freed at unpredictable
times, many by gRPC's own threads. With glibc's defaults each thread gets an
arena of its own and the mmap threshold grows after the first large free,
so such buffers end up inside heaps that are never returned: RSS stays at
its peak long after the flood. A fixed mmap threshold puts every large buffer
in its own mapping (returned at free), and a small arena count keeps the
rest compact. Does nothing where glibc is not the C library.
"""

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


def return_memory_after_peaks() -> None:
    """Apply the settings above; call before threads start (gRPC's included)."""
    path = ctypes.util.find_library("c")
    if path is None:
        return
    libc = ctypes.CDLL(path)
    if not hasattr(libc, "mallopt"):
        return
    for option, value in _SETTINGS:
        if libc.mallopt(option, value) != 1:
            logger.debug("mallopt(%d, %d) refused", option, value)
