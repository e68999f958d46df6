"""How much memory the device's model may use right now.

Under a cgroup v2 limit (a container, a systemd slice): `memory.max - memory.current` of the process's cgroup,
since that, not the machine's free memory, is where the kernel's OOM killer draws the line. Without a limit
(`memory.max` is `max`, or no cgroup v2 files): the system's available memory (psutil). The cgroup folder is
configurable so tests and the demo point it at files they write.
"""
from __future__ import annotations

from pathlib import Path

import psutil

MIB = 1 << 20
DEFAULT_CGROUP = "/sys/fs/cgroup"


class MemorySource:
    def __init__(self, cgroup_dir: Path | str = DEFAULT_CGROUP):
        self.cgroup_dir = Path(cgroup_dir)

    def available_mb(self) -> float:
        limit = self._read("memory.max")
        if limit is not None and limit != "max":
            used = self._read("memory.current")
            return max(0.0, (int(limit) - int(used or 0)) / MIB)
        return psutil.virtual_memory().available / MIB

    def _read(self, name: str) -> str | None:
        try:
            return (self.cgroup_dir / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
