"""The device agent: enroll with a profile, follow the retained desired state, install, report, stay present.

Threads: paho's network loop (callbacks only record and notify), one worker that installs and re-sends an
unanswered enrollment, and a heartbeat thread (so a long download does not make the device look stale). The
enrollment is re-sent with the same request id until an answer arrives, so a coordinator that died before
committing it gets it again, and one that had committed it answers the same way (idempotent); request ids carry a
sequence counted on the device's disk, so coordinators can tell which of two enrollments came later. Presence: a
retained `state` message, online on connect and offline as the last will, numbered with a connection sequence kept
in the device folder so late news of an old connection cannot override a newer one. The desired state's version
only goes up for a device (the registry's promise), so the highest version followed is kept in the device folder
too: an older state, even one the coordinator really signed, is a replay (a retained message put back by whoever
can publish it) and is refused, across restarts.

Ladders (a profile with `storage_mb`): the desired state lists rungs; every rung is fetched and verified before the
ladder replaces anything, then a memory watcher thread (`client.memory`, `client.switching`) picks the rung that
fits the memory available now, writes it to the device folder (`client.ladder_store`, where the application's
`client.runtime.Runtime` and the Flower ClientApp read it) and reports each switch (status SWITCHED). No network
is needed to switch: the rungs' blocks are already on the device.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from client.download import DownloadError, current_manifest_bytes, install, install_ladder
from client.ladder_store import HeldRung, drop_ladder, read_ladder, set_running
from client.memory import MemorySource
from client.switching import RungSwitcher
from shared.mqtt import make_client
from shared.artifacts import Manifest, atomic_write, sha256_bytes
from shared.config import BrokerConfig
from shared.errors import IntegrityError
from shared.signing import SignatureError, Verifier
from shared.messages import (Desired, Enroll, ErrorReply, Heartbeat, MessageError, Presence, Profile, Status,
                             decode_desired, decode_error, encode, topic)

log = logging.getLogger("restnet.agent")

RETRY_MAX_S = 60.0
VERSION_FILE = "desired_version"  # in the device folder: the highest desired-state version followed
REQUEST_FILE = "request_seq"  # in the device folder: the sequence of the last request id made (ordered ids)


class DeviceAgent:
    def __init__(self, device_id: str, broker: BrokerConfig, password: str | None, profile: Profile,
                 device_dir: Path | str, http_ca_file: str | None = None, heartbeat_s: float = 10.0,
                 enroll_retry_s: float = 5.0, on_installed: Callable[[Path], None] | None = None,
                 trusted: Verifier | None = None, memory: MemorySource | None = None, memory_poll_s: float = 0.5,
                 hold_s: float = 10.0):
        """`trusted`: the coordinator's public keys; with them, a desired state or manifest that is not signed by
        one of them is refused (the installed variant stays, the refusal is reported as FAILED).
        `memory`, `memory_poll_s`, `hold_s`: where a ladder's device reads its available memory, how often, and
        how long memory must stay free before it climbs back up a rung."""
        self.device_id = device_id
        self.device_dir = Path(device_dir)
        self.device_dir.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.http_ca_file = http_ca_file
        self.heartbeat_s = heartbeat_s
        self.enroll_retry_s = enroll_retry_s
        self.on_installed = on_installed
        self.trusted = trusted
        # Devices authenticate with their own credentials; client certificates are the coordinator's.
        self.client, self.address = make_client(dataclasses.replace(broker, cert_file=None, key_file=None),
                                                device_id, device_id, password, clean_session=False)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_pre_connect = self._on_pre_connect
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._cond = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name=f"agent-{device_id}", daemon=True)
        self._beater = threading.Thread(target=self._beat, name=f"heartbeat-{device_id}", daemon=True)
        self.memory = memory or MemorySource()
        self.memory_poll_s, self.hold_s = memory_poll_s, hold_s
        self._watcher = threading.Thread(target=self._watch, name=f"memory-{device_id}", daemon=True)
        # What the agent knows; read by tests and the fleet simulator through wait().
        self.connected = False
        self.connect_error: str | None = None
        self.request_id = self._next_request_id()
        self.answered = False  # the current request_id got its desired state (or an error)
        self.desired: Desired | None = None
        self.last_error: ErrorReply | None = None
        self.status: str | None = None  # last state reported for the current desired version
        self.failure: str | None = None
        data = current_manifest_bytes(self.device_dir)
        self.installed: Manifest | None = Manifest.from_bytes(data) if data else None
        self._installed_sha = sha256_bytes(data) if data else None
        self._applied: tuple[int, str] | None = None  # (desired version, assignment id) handled
        self._followed = _read_count(self.device_dir / VERSION_FILE)
        self.ladder: list[HeldRung] = read_ladder(self.device_dir)  # the rungs held, top first
        self._switcher: RungSwitcher | None = None  # made for the ladder on the first memory reading
        self.running: str | None = None  # the rung running now (ladders only)
        self.switches: list[tuple[float, str]] = []  # (monotonic time, rung) of every switch made
        self._retry_at = 0.0
        self._retry_s = 1.0
        self._enrolled_at = 0.0
        self._seq = 0

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> "DeviceAgent":
        self.client.connect_async(self.address.host, self.address.port, keepalive=max(5, int(self.heartbeat_s * 3)))
        self.client.loop_start()
        self._worker.start()
        self._beater.start()
        self._watcher.start()
        return self

    def stop(self) -> None:
        """Leave like a crash would not: publish offline, then disconnect (the last will is for crashes)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join(10)
        self._beater.join(10)
        self._watcher.join(10)
        if self.connected:
            info = self.client.publish(topic(self.device_id, "state"),
                                       encode(Presence(self.device_id, False, self._seq)), qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):  # the connection went while we were leaving
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _next_request_id(self) -> str:
        """`<sequence>.<random>` (shared.vocabulary.ORDERED_REQUEST): coordinators can tell which of two
        enrollments this device made later, even when two of them handle both at once."""
        path = self.device_dir / REQUEST_FILE
        sequence = _read_count(path) + 1
        atomic_write(path, str(sequence).encode())
        return f"{sequence}.{uuid.uuid4().hex[:12]}"

    def update_profile(self, profile: Profile) -> None:
        """The device's budget changed: enroll again with a new request id."""
        with self._cond:
            self.profile, self.request_id, self.answered = profile, self._next_request_id(), False
            self._enrolled_at = 0.0
            self._cond.notify_all()

    def wait(self, predicate: Callable[["DeviceAgent"], bool], timeout: float) -> bool:
        """Block until `predicate(agent)` holds (checked on every change) or `timeout` seconds pass."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # ---- MQTT callbacks ---------------------------------------------------------------------------------

    def _on_pre_connect(self, client, userdata):
        seq_file = self.device_dir / "presence_seq"
        self._seq = _read_count(seq_file) + 1
        atomic_write(seq_file, str(self._seq).encode())
        client.will_set(topic(self.device_id, "state"), encode(Presence(self.device_id, False, self._seq)),
                        qos=1, retain=True)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            if reason_code.is_failure:
                self.connect_error = str(reason_code)
                self._cond.notify_all()
                return
            self.connected, self.connect_error = True, None
            client.subscribe([(topic(self.device_id, "desired"), 1), (topic(self.device_id, "error"), 1)])
            client.publish(topic(self.device_id, "state"), encode(Presence(self.device_id, True, self._seq)),
                           qos=1, retain=True)
            self._enrolled_at = 0.0  # (re)send a pending enrollment now
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.connected = False
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        try:
            if msg.topic.endswith("/desired"):
                try:
                    desired = decode_desired(self.device_id, msg.payload, self.trusted)
                except SignatureError as exc:
                    self._refuse(f"desired state refused: {exc}")
                    return
                if desired.version < self._followed:  # a replay, or late news in a cluster: not a failure to report
                    reason = (f"desired state v{desired.version} ignored: this device already followed "
                              f"v{self._followed} (a replayed message? after a registry reset, delete "
                              f"{self.device_dir / VERSION_FILE})")
                    log.warning("%s: %s", self.device_id, reason)
                    with self._cond:
                        self.failure = reason
                        self._cond.notify_all()
                    return
                if desired.version > self._followed:
                    atomic_write(self.device_dir / VERSION_FILE, str(desired.version).encode())
                with self._cond:
                    self._followed = max(self._followed, desired.version)
                    self.desired = desired
                    if desired.request_id == self.request_id:
                        self.answered = True
                    self._cond.notify_all()
            else:
                error = decode_error(msg.payload)
                with self._cond:
                    self.last_error = error
                    if error.request_id == self.request_id:
                        self.answered = True
                    self._cond.notify_all()
        except MessageError as exc:
            log.warning("%s: ignoring a bad message on %s: %s", self.device_id, msg.topic, exc)

    def _refuse(self, reason: str) -> None:
        """A desired state the coordinator did not sign (a forged or replaced retained message, a broker that lets
        others publish): keep what is installed, and say so against the last instruction that did verify."""
        reason = reason[:500]
        log.warning("%s: %s", self.device_id, reason)
        with self._cond:
            self.failure, last = reason, self.desired
            self._cond.notify_all()
        if last is not None:
            self._report(last, "FAILED", reason)

    # ---- the worker -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                due = self._due()  # every change of state notifies, so with nothing due: wait for one
                self._cond.wait(timeout=None if due == float("inf") else max(0.0, due - time.monotonic()))
                if self._stopping:
                    return
                now = time.monotonic()
                enroll = self.connected and not self.answered and now >= self._enrolled_at + self.enroll_retry_s
                if enroll:
                    self._enrolled_at = now
                    message = Enroll(self.device_id, self.request_id, self.profile)
                desired = self.desired
            if enroll:
                self.client.publish(topic(self.device_id, "enroll"), encode(message), qos=1)
            if desired is not None and self._needs_apply(desired) and time.monotonic() >= self._retry_at:
                self._apply(desired)

    def _beat(self) -> None:
        seq = 0
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, self.heartbeat_s):
                    return
                connected = self.connected
            if connected:
                seq += 1
                self.client.publish(topic(self.device_id, "heartbeat"), encode(Heartbeat(self.device_id, seq)), qos=0)

    def _due(self) -> float:
        """When the worker must wake next for an enrollment re-send or an install retry (monotonic time)."""
        due = self._enrolled_at + self.enroll_retry_s if self.connected and not self.answered else float("inf")
        if self.desired is not None and self._needs_apply(self.desired):
            due = min(due, self._retry_at)
        return due

    def _needs_apply(self, desired: Desired) -> bool:
        return self._applied != (desired.version, desired.assignment_id)

    def _apply(self, desired: Desired) -> None:
        a = desired.assignment
        if a is None:  # refused: keep whatever is installed, report nothing to install
            self._mark_applied(desired, None)
            return
        if self._installed_sha == a.manifest_sha256 and self._holds_rungs(desired):
            if desired.rungs is None and self.ladder:  # the same variant, now without a ladder: nothing to fetch
                drop_ladder(self.device_dir)
                with self._cond:
                    self._take_ladder([])
            self._report(desired, "INSTALLED")
            self._mark_applied(desired, "INSTALLED")
            return
        self._report(desired, "DOWNLOADING")
        try:
            verified = lambda m: self._report(desired, "VERIFIED")  # noqa: E731
            if desired.rungs is None:
                manifest = install(a, self.device_dir, self.http_ca_file, on_verified=verified, trusted=self.trusted)
            else:
                manifest = install_ladder(desired.rungs, self.device_dir, self.http_ca_file, on_verified=verified,
                                          trusted=self.trusted)[0]
        except (IntegrityError, DownloadError, OSError) as exc:
            reason = str(exc)[:500]
            log.warning("%s: install of %s v%d failed: %s", self.device_id, a.variant_id, a.variant_version, reason)
            self._report(desired, "FAILED", reason)
            with self._cond:
                self.failure = reason
                self._retry_at = time.monotonic() + self._retry_s
                self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)
                self._cond.notify_all()
            return
        with self._cond:
            self.installed, self._installed_sha, self.failure = manifest, a.manifest_sha256, None
            self._retry_s = 1.0
            self._take_ladder(read_ladder(self.device_dir))
        self._report(desired, "INSTALLED")
        self._mark_applied(desired, "INSTALLED")
        if self.on_installed is not None:
            try:
                self.on_installed(self.device_dir)
            except Exception:  # the hook is someone else's code: log it, keep the agent alive
                log.exception("%s: on_installed hook failed", self.device_id)

    def _holds_rungs(self, desired: Desired) -> bool:
        """Beside the installed variant, does the device hold the rungs this desired state asks for (none, or
        exactly its ladder)?"""
        return desired.rungs is None or \
            [r.manifest_sha256 for r in self.ladder] == [r.manifest_sha256 for r in desired.rungs]

    def _take_ladder(self, rungs: list[HeldRung]) -> None:
        """Under the lock: a new ladder; the watcher picks its rung on its next reading."""
        self.ladder, self._switcher, self.running = rungs, None, None
        self._cond.notify_all()

    # ---- the memory watcher (ladders) -------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, self.memory_poll_s):
                    return
            self.check_memory()

    def check_memory(self) -> str | None:
        """One reading of the available memory: switch rungs if the policy says so; returns the rung running."""
        with self._cond:
            ladder, desired = self.ladder, self.desired
        if not ladder:
            return None
        available = self.memory.available_mb()
        now = time.monotonic()
        with self._cond:
            if ladder is not self.ladder:  # replaced meanwhile: the next reading is for the new one
                return self.running
            if self._switcher is None:  # a new ladder starts on the rung that fits now, without waiting
                self._switcher = RungSwitcher([r.memory_mb for r in ladder], self.hold_s)
                self._switcher.current = self._switcher.best_fit(available)
            rung = ladder[self._switcher.decide(available, now)]
            if rung.variant_id == self.running:
                return self.running
            set_running(self.device_dir, rung)
            if desired is None or desired.rungs is None:  # a restart, before the retained state arrived: the
                return rung.variant_id  # rung runs now, and is chosen again and reported once it is known
            self.running = rung.variant_id
            self.switches.append((now, rung.variant_id))
            self._cond.notify_all()
        log.info("%s: runs rung %s (%.1f MiB available, it needs %.1f)", self.device_id, rung.variant_id,
                 available, rung.memory_mb)
        self.client.publish(topic(self.device_id, "status"),
                            encode(Status(self.device_id, desired.assignment_id, "SWITCHED", rung.variant_id)), qos=1)
        return rung.variant_id

    def _report(self, desired: Desired, state: str, reason: str | None = None) -> None:
        a = desired.assignment
        self.client.publish(topic(self.device_id, "status"),
                            encode(Status(self.device_id, desired.assignment_id, state, a.variant_id if a else None,
                                          reason)), qos=1)
        with self._cond:
            self.status = state
            self._cond.notify_all()

    def _mark_applied(self, desired: Desired, status: str | None) -> None:
        with self._cond:
            self._applied = (desired.version, desired.assignment_id)
            self.status = status
            self._cond.notify_all()


def _read_count(path: Path) -> int:
    """A counter the agent keeps in the device folder (0 when absent)."""
    try:
        return int(path.read_text()) if path.is_file() else 0
    except ValueError:  # written atomically, so only someone else's edit: start over rather than not at all
        log.warning("%s is not a number: counting from 0 again", path)
        return 0
