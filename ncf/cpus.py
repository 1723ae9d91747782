"""CPUs this process may run on (torch-free, shared by training and batch/)."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """The CPUs of this process's affinity mask (a container's quota shows there), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
