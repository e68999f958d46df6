"""Peak resident memory of a process tree (this process and every descendant), sampled in a thread.

Two sums per sample: RSS (what `top` shows per process; the shared library pages of torch, ~400 MiB per process
here, count once per process) and PSS (each shared page split between the processes that map it: the machine's
real use, the figure the demo's memory goal is about). The peak of each sum is kept.
"""
from __future__ import annotations

import threading

import psutil

MIB = 1 << 20


class TreeMemory:
    """`with TreeMemory() as mem: ...` then `mem.peak_rss`, `mem.peak_pss` (bytes), `mem.peak_processes`, and what
    held it (`mem.peak_by_name`)."""

    def __init__(self, root_pid: int | None = None, interval: float = 0.5, pss: bool = True):
        self.root = psutil.Process(root_pid)
        self.interval, self.pss = interval, pss
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.peak_by_name: dict[str, list] = {}  # at the RSS peak: process name -> [count, RSS, PSS]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def sample(self) -> tuple[int, int, dict]:
        """(sum of RSS, sum of PSS, {process name: [count, RSS, PSS]}) now."""
        rss = pss = 0
        by_name: dict[str, list] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                info = proc.memory_full_info() if self.pss else proc.memory_info()
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # ended between the listing and the reading
            entry = by_name.setdefault(name, [0, 0, 0])
            entry[0] += 1
            entry[1] += info.rss
            entry[2] += getattr(info, "pss", 0)
            rss += info.rss
            pss += getattr(info, "pss", 0)
        return rss, pss, by_name

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss, by_name = self.sample()
            if rss > self.peak_rss:
                self.peak_rss, self.peak_by_name = rss, by_name
                self.peak_processes = sum(n for n, _, _ in by_name.values())
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        """PSS first: it is the physical memory the processes use (a page shared by several processes, as torch's
        libraries are, is split between them); the sum of RSS counts such a page once per process that maps it."""
        return (f"peak memory of the demo's {self.peak_processes} processes: {self.peak_pss / MIB:,.0f} MiB "
                f"(sum of PSS: physical memory, pages shared between processes counted once); sum of RSS "
                f"{self.peak_rss / MIB:,.0f} MiB (each process's shared library pages counted again)")
