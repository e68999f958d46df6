"""At most N processes of one host inside a heavy section at once (e.g. ClientApps that import torch and train).

On a host that runs several SuperNodes (the demo, a test rig, a gateway serving several sensors), Flower starts
one ClientApp process per message, so a round starts one torch process per device at the same moment. Six of them
on a 2-core machine buy no speed (the work is mostly the process start and imports) and cost ~1 GB each. With
`RESTNET_TORCH_SLOTS=N` and `RESTNET_TORCH_SLOTS_DIR=folder` in the environment (children inherit it: a SuperNode's
ClientApp processes too), a training ClientApp takes one of N slot files (`slot-0.lock` ... ) with an exclusive
`fcntl.flock` before importing torch, and keeps it until the process ends. The kernel drops a lock when its
holder's file descriptor closes, so a process that crashes or is killed frees its slot: nothing to clean up.

Without the variables (a real device: one SuperNode per machine) nothing is locked. Not for the simulation
engine (`restnet fl simulate`): its ClientApp actors live for the whole run, so an actor would keep its slot and,
with fewer slots than actors, the others would wait for ever.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from shared.errors import RestnetError

SLOTS_ENV = "RESTNET_TORCH_SLOTS"
SLOTS_DIR_ENV = "RESTNET_TORCH_SLOTS_DIR"

_HELD: list[int] = []  # this process's slot file descriptors: held until it exits


def default_slots() -> int:
    """The cores this process may run on (a container's or `taskset`'s limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 2


def slots_from_env(environ=os.environ) -> tuple[Path, int] | None:
    """(folder, count) when this host caps its heavy processes, else None (also for a count of 0)."""
    count, folder = environ.get(SLOTS_ENV, "").strip(), environ.get(SLOTS_DIR_ENV, "").strip()
    if not count or not folder:
        return None
    if not count.isdigit():
        raise RestnetError(f"{SLOTS_ENV}={count[:40]!r} is not a whole number",
                           "set it to how many ClientApps may load torch at once on this host, or unset it")
    return (Path(folder), int(count)) if int(count) > 0 else None


def acquire_slot(folder: Path, count: int, poll: float = 0.05) -> int:
    """Block until one of `count` slots in `folder` is ours; return its index. Held until the process ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = os.getpid() % count  # waiters spread over the slots instead of all trying slot 0 first
    while True:
        for i in range(count):
            index = (start + i) % count
            fd = os.open(folder / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _HELD.append(fd)
            return index
        time.sleep(poll)


def acquire_from_env() -> tuple[int, float] | None:
    """Take a slot when the environment configures slots and this process holds none yet:
    (slot index, seconds waited), or None when nothing was taken."""
    slots = slots_from_env()
    if slots is None or _HELD:
        return None
    began = time.monotonic()
    index = acquire_slot(*slots)
    return index, time.monotonic() - began

