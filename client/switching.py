"""Which rung of its ladder a device runs, given the memory it has: down at once, up only after a hold time.

Down at once because a model that no longer fits gets the process killed; up only after the memory has stayed
free for `hold_s` (hysteresis), so a budget that wobbles around a rung's need does not make the device rebuild
models back and forth. The best rung that fits is the first one whose need is at most what is available (rungs
are ordered by decreasing need); when none fits, the smallest, which is the least that can still run.
"""
from __future__ import annotations


class RungSwitcher:
    def __init__(self, needs_mb: list[float], hold_s: float, current: int = 0):
        """`needs_mb`: each rung's memory need, top rung first (strictly decreasing)."""
        self.needs_mb, self.hold_s, self.current = list(needs_mb), hold_s, current
        self._free_since: float | None = None  # since when a higher rung has fitted without a break

    def best_fit(self, available_mb: float) -> int:
        return next((i for i, need in enumerate(self.needs_mb) if need <= available_mb), len(self.needs_mb) - 1)

    def decide(self, available_mb: float, now: float) -> int:
        """The rung to run now (updates `current`)."""
        best = self.best_fit(available_mb)
        if best > self.current:  # less memory than the current rung needs: down now
            self.current, self._free_since = best, None
        elif best < self.current:
            if self._free_since is None:
                self._free_since = now
            if now - self._free_since >= self.hold_s:
                self.current, self._free_since = best, None
        else:
            self._free_since = None
        return self.current
