"""CPUs this process may run on (torch-free, shared by training and batch/)."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """The CPUs of this process's affinity mask (cpusets of containers and `taskset` show
    there; a CPU-time quota such as `docker --cpus` does not), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
