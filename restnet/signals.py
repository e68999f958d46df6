"""Long-running commands stop cleanly on SIGINT or SIGTERM (Ctrl-C, `docker stop`)."""
from __future__ import annotations

import signal
import threading


def stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
