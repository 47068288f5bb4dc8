"""CPU and memory of this process from /proc/self (no psutil on the device), for the page's status panel."""
from __future__ import annotations

import os
import threading
import time

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _cpu_seconds() -> float | None:
    try:
        with open("/proc/self/stat", "rb") as fh:
            # the command name (field 2) may hold spaces: count fields after its closing parenthesis
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime + stime


def rss_mb() -> float | None:
    """Resident memory of this process in MB; None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return round(int(fh.read().split()[1]) * _PAGE_BYTES / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU use of this process in percent of one core, averaged between two readings (the page polls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (time.monotonic(), _cpu_seconds())
        self._percent: float | None = None

    def percent(self, min_interval_s: float = 1.0) -> float | None:
        """The average since the previous reading at least ``min_interval_s`` ago (faster polls see the same
        value); None where /proc is missing."""
        with self._lock:
            now, cpu = time.monotonic(), _cpu_seconds()
            then, cpu_then = self._last
            if cpu is None or cpu_then is None:
                return None
            if now - then >= min_interval_s or self._percent is None:
                self._percent = round(100.0 * (cpu - cpu_then) / max(now - then, 1e-3), 1)
                self._last = (now, cpu)
            return self._percent
