"""Facts about processes of this machine: whether one is alive (a local job, a cache builder), when one started."""
from __future__ import annotations

import os
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def started_at(pid: int | None = None) -> float | None:
    """When a process started, in seconds since the epoch, from /proc (Linux; None elsewhere): before it imported
    anything, unlike any time it can log itself."""
    try:
        fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])  # to 10 ms (btime: to 1 s)
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
    except (OSError, ValueError, IndexError):
        return None
