"""Keeping a process that hosts many devices small (the simulation): glibc's allocator settings.

With a thread per simulated device, glibc gives threads arenas of their own (up to 8 per core) and, once a
large block was freed, raises its mmap threshold, so a device's model and optimiser state, freed between
its turns, stay in the arenas as holes instead of going back to the system: measured, 40 devices took
16 MB each instead of under 1. Fewer arenas and a fixed mmap threshold give the memory back."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedafd.memory")

_M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


def compact_allocator(arenas: int = 2, mmap_threshold: int = 64 * 1024) -> bool:
    """Call before the threads start: at most `arenas` malloc arenas, and blocks of `mmap_threshold` bytes or
    more mapped (and unmapped when freed) instead of kept in the heap. False where libc is not glibc."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt here; the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
