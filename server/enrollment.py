"""What the coordinator does with device messages: registry rows in, desired states out.

Enrollment is idempotent on (device id, request id): a repeated request gets the stored answer again. A device's
desired-state version moves only when what it should run changes (another variant, a new version of its variant,
a refusal). Status, presence and heartbeats only update the registry. Everything here runs on the transport's
worker, inside its transaction: answers are published after they are committed.

With a shared registry (several coordinators), a transaction first locks the devices it will write
(`Registry.lock_devices`, once, all together), and a retained desired state this coordinator published is checked
against the registry once the broker has it (`stale_desired`): if another coordinator committed a newer state
meanwhile, whose publication may have reached the broker first, the newer one is published again, so the state
the broker retains last is the registry's.
"""
from __future__ import annotations

import json
import logging
import uuid
from contextlib import contextmanager

from server.metrics import FleetMetrics
from server.registry import DeviceRow, Registry
from server.ladder import ladder
from server.registry_base import remember
from server.transport import Incoming, Outgoing
from server.versioning import VariantVersions
from shared.messages import (Desired, Enroll, ErrorReply, Heartbeat, MessageError, Presence, Profile, Refusal, Status,
                             decode, decode_desired, encode, parse_topic, topic)
from shared.signing import Signer
from shared.vocabulary import request_sequence

DEVICE_TOPICS = ("enroll", "status", "state", "heartbeat")  # what devices publish and the coordinator reads
RACE_WINDOW_S = 30.0  # how long an older enrollment of a device cannot replace its current state (`overtaken`)

log = logging.getLogger("restnet.coordinator")


class Enrollment:
    def __init__(self, registry: Registry, variants: VariantVersions, metrics: FleetMetrics,
                 signer: Signer | None = None):
        self.registry, self.variants, self.metrics, self.signer = registry, variants, metrics, signer

    @contextmanager
    def transaction(self, items: list[Incoming]):
        """One registry transaction for a batch of device messages, their devices locked first."""
        with self.registry.transaction():
            ids = []
            for item in items:
                try:
                    ids.append(parse_topic(item.topic)[0])
                except MessageError:
                    pass  # not a fleet topic: handle() counts it and touches nothing
            self.registry.lock_devices(ids)
            yield

    def handle(self, item: Incoming, out: list[Outgoing], now: float) -> None:
        """One device message: validated, applied to the registry; answers and errors appended to `out`."""
        try:
            device_id, kind = parse_topic(item.topic)
            msg = decode(kind, device_id, item.payload)
        except MessageError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            if exc.code != "bad_topic":
                out.append(Outgoing(topic(device_id, "error"),
                                    encode(ErrorReply(exc.code, exc.message, exc.request_id)), False))
            return
        if isinstance(msg, Enroll):
            try:
                self._enroll(msg, out, now, item.arrived)
            except Exception:  # our fault, not the device's: say so, or it would retry the same request forever
                log.exception("could not answer enrollment %s of %s", msg.request_id, msg.device_id)
                self.metrics.rejected.labels("internal").inc()
                reply = ErrorReply("internal", "the coordinator failed on this enrollment; it was not applied",
                                   msg.request_id)
                out.append(Outgoing(topic(msg.device_id, "error"), encode(reply), False))
        elif isinstance(msg, Status) and msg.state == "SWITCHED":
            self.metrics.status_reports.labels(msg.state).inc()
            if self.registry.set_running(msg.device_id, msg.assignment_id, msg.variant_id):
                self.metrics.rung_switches.inc()
        elif isinstance(msg, Status):
            self.metrics.status_reports.labels(msg.state).inc()
            self.registry.set_state(msg.device_id, msg.assignment_id, msg.state.lower(), msg.reason, now)
        elif isinstance(msg, Presence):
            self.registry.set_presence(msg.device_id, "online" if msg.online else "offline", msg.seq, now)
        elif isinstance(msg, Heartbeat):
            self.registry.touch(msg.device_id, now)

    def _enroll(self, msg: Enroll, out: list[Outgoing], now: float, arrived: float) -> None:
        prev = self.registry.get(msg.device_id)
        if prev is not None and prev.answered(msg.request_id):  # a recent request again: the current state
            dev, result = prev, "duplicate"
        elif prev is not None and overtaken(msg.request_id, prev, now):  # the device has moved on: the newer stands
            dev, result = prev, "overtaken"
        else:
            dev, result = self._assign(msg.device_id, msg.profile, msg.request_id, prev, now)
            self.registry.put(dev)
        self.metrics.enrollments.labels(result).inc()
        out.append(Outgoing(topic(dev.id, "desired"), dev.desired, True, arrived))

    def _assign(self, device_id: str, profile: Profile, request_id: str, prev: DeviceRow | None,
                now: float) -> tuple[DeviceRow, str]:
        """The device's next row and desired state; the version moves only when what it should run changes."""
        choice = self.variants.assigner.choose(profile)
        assignment, refusal = (None, choice) if isinstance(choice, Refusal) else \
            (self.variants.assignment(choice.id), None)
        rungs = None
        if assignment is not None and profile.storage_mb is not None:
            recs = ladder(self.variants.assigner, choice, profile, self.variants.blocks)
            rungs = [self.variants.rung(r.id) for r in recs]
        held = tuple(f"{r.variant_id}@{r.variant_version}" for r in rungs or ())
        variant = (assignment.variant_id, assignment.variant_version) if assignment else (None, None)
        if prev is not None and (prev.variant_id, prev.variant_version, prev.rungs) == (*variant, held):
            version, assignment_id, state, reason = prev.version, prev.assignment_id, prev.state, prev.reason
            result = "unchanged" if assignment else "refused"
        else:
            version, assignment_id, reason = (prev.version + 1 if prev else 1), uuid.uuid4().hex[:16], None
            state = "assigned" if assignment else "refused"
            result = "refused" if refusal else ("assigned" if prev is None else "reassigned")
        desired = encode(Desired(device_id, version, assignment_id, request_id, assignment, refusal, rungs),
                         self.signer)
        requests = remember(prev.requests if prev else (), request_id)
        running = prev.running if prev is not None and prev.assignment_id == assignment_id else None
        row = DeviceRow(device_id, profile, request_id, version, assignment_id, variant[0], variant[1], desired,
                        state, reason, prev.enrolled_at if prev else now, now, requests, held, running)
        return row, result

    def follow_new_version(self, variant_id: str, out: list[Outgoing], now: float) -> int:
        """Devices that hold an older version of `variant_id` (as their variant or as a rung of their ladder) get
        a new desired state (the best variant or ladder for their profile now, normally with the new version);
        returns how many."""
        current = self.variants.catalog.get(variant_id).version
        ids = [row.id for row in self.registry.on_variant(variant_id)]
        self.registry.lock_devices(ids)
        moved = 0
        for device_id in ids:
            prev = self.registry.get(device_id)  # again, under the lock: another coordinator may have moved it
            if (prev.holds(variant_id) or current) >= current:
                continue  # already told (by this coordinator or another one sharing the registry)
            row, _ = self._assign(prev.id, prev.profile, prev.request_id, prev, now)
            self.registry.put(row)
            out.append(Outgoing(topic(row.id, "desired"), row.desired, True))
            moved += 1
        return moved

    def resign_all(self, out: list[Outgoing], now: float) -> int:
        """Desired states signed by another key (or none) signed again by ours and published: after a key
        rotation, devices that trust only the new key still get their instructions. Content and versions stay."""
        if self.signer is None:
            return 0
        ids = [device_id for device_id, payload in self.registry.all_desired()
               if json.loads(payload).get("key_id") != self.signer.key_id]
        self.registry.lock_devices(ids)
        resigned = 0
        for device_id in ids:
            row = self.registry.get(device_id)  # again, under the lock: another coordinator may have changed it
            if json.loads(row.desired).get("key_id") == self.signer.key_id:
                continue
            row.desired = encode(decode_desired(device_id, row.desired), self.signer)
            self.registry.put(row)
            out.append(Outgoing(topic(device_id, "desired"), row.desired, True))
            resigned += 1
        return resigned

    def stale_desired(self, published: list[Outgoing]) -> list[Outgoing]:
        """Of these retained desired states, now held by the broker, those the registry has replaced since:
        the registry's current state for each, to publish again (it may have reached the broker first)."""
        sent = {o.topic: o.payload for o in published}
        ids = [parse_topic(t)[0] for t in sent]
        current = self.registry.desired_of(ids)
        return [Outgoing(topic(i, "desired"), d, True) for i, d in current.items() if d != sent[topic(i, "desired")]]

    def republish_all(self, out: list[Outgoing], now: float) -> int:
        """Every device's retained desired state again (for a broker that lost them)."""
        rows = self.registry.all_desired()
        out.extend(Outgoing(topic(device_id, "desired"), desired, True) for device_id, desired in rows)
        return len(rows)


def overtaken(request_id: str, current: DeviceRow, now: float) -> bool:
    """An enrollment the device made before the one its current state answers, arriving after it (two coordinators
    held both at once, or a redelivery): it must not replace the newer one. Only within RACE_WINDOW_S of the
    current state, so a device whose folder was wiped (its sequence starts over) is served again soon after."""
    mine, answered = request_sequence(request_id), request_sequence(current.request_id)
    return mine is not None and answered is not None and mine < answered and now - current.updated_at < RACE_WINDOW_S
