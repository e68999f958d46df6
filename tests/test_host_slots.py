"""The host's torch slots (`shared.host_slots`) with real processes: never more holders at once than slots,
measured by the timestamps the processes write; a holder that is killed frees its slot; unset means no lock."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.errors import RestnetError
from shared.host_slots import SLOTS_DIR_ENV, SLOTS_ENV, slots_from_env

# Takes a slot the way the ClientApp does (from the environment), records when it got in and when it left.
HOLDER = textwrap.dedent("""
    import json, os, sys, time
    from shared.host_slots import acquire_from_env
    out, hold = sys.argv[1], float(sys.argv[2])
    slot = acquire_from_env()
    entered = time.time()
    open(out + ".in", "w").write(str(entered))
    time.sleep(hold)
    left = time.time()
    open(out, "w").write(json.dumps({"slot": slot and slot[0], "in": entered, "out": left}))
""")

ROOT = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, name: str, hold: float, slots: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (SLOTS_ENV, SLOTS_DIR_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if slots is not None:
        env[SLOTS_ENV], env[SLOTS_DIR_ENV] = str(slots), str(tmp_path / "slots")
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / name), str(hold)], env=env)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    inside = most = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return most


def run_all(tmp_path: Path, count: int, hold: float, slots: int | None) -> list[dict]:
    procs = [start(tmp_path, f"p{i}", hold, slots) for i in range(count)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    return [json.loads((tmp_path / f"p{i}").read_text()) for i in range(count)]


def test_one_slot_admits_one_process_at_a_time(tmp_path):
    done = run_all(tmp_path, 3, 0.6, slots=1)
    assert max_overlap([(d["in"], d["out"]) for d in done]) == 1
    assert {d["slot"] for d in done} == {0}
    assert max(d["out"] for d in done) - min(d["in"] for d in done) >= 3 * 0.6  # in turn, not at once


def test_two_slots_admit_two_at_once(tmp_path):
    done = run_all(tmp_path, 4, 1.0, slots=2)
    assert max_overlap([(d["in"], d["out"]) for d in done]) == 2
    assert {d["slot"] for d in done} == {0, 1}


def test_no_slots_configured_locks_nothing(tmp_path):
    done = run_all(tmp_path, 3, 1.5, slots=None)
    assert max_overlap([(d["in"], d["out"]) for d in done]) == 3
    assert all(d["slot"] is None for d in done)
    assert not (tmp_path / "slots").exists()


def test_a_killed_holder_frees_its_slot(tmp_path):
    holder = start(tmp_path, "holder", 600, slots=1)
    deadline = time.monotonic() + 30
    while not (tmp_path / "holder.in").is_file():
        assert time.monotonic() < deadline, "the first process never got the slot"
        time.sleep(0.05)
    waiter = start(tmp_path, "waiter", 0.1, slots=1)
    time.sleep(1.5)
    assert not (tmp_path / "waiter.in").exists(), "got in while the slot was held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert waiter.wait(timeout=30) == 0
    assert json.loads((tmp_path / "waiter").read_text())["slot"] == 0


def test_settings():
    assert slots_from_env({}) is None
    assert slots_from_env({SLOTS_ENV: "0", SLOTS_DIR_ENV: "/x"}) is None
    assert slots_from_env({SLOTS_ENV: "2"}) is None
    assert slots_from_env({SLOTS_ENV: "2", SLOTS_DIR_ENV: "/x"}) == (Path("/x"), 2)
    with pytest.raises(RestnetError, match="RESTNET_TORCH_SLOTS='two' is not a whole number"):
        slots_from_env({SLOTS_ENV: "two", SLOTS_DIR_ENV: "/x"})


def test_default_slots_are_the_cores_this_process_may_use():
    """`taskset -c 0` on a multi-core machine: one slot, not the machine's core count."""
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from shared.host_slots import default_slots; print(default_slots())"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
