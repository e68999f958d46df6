"""The coordinator's MQTT side: a persistent session, one worker thread, group commit, then publish and PUBACK.

paho's network loop only queues what arrives. One worker thread owns every registry write: it drains the queue in
batches, hands each message to `handle` inside one registry transaction (group commit), and only after the commit
publishes what the batch produced and acknowledges the batch's messages (manual PUBACK). So an answer a device has
seen is always in the registry, and a message not yet committed when the coordinator died is redelivered by the
broker to the coordinator's persistent session when it comes back.

Work that must run under the same rules (it writes the registry and may publish) is queued as a task with `call`;
each task, and each sweep, runs in a transaction of its own.

Several coordinators (`share_group` set): the session speaks MQTT 5 and subscribes to `$share/<group>/<filter>`, so
the broker hands each device message to one coordinator of the group; the session expires `session_expiry_s` after
a disconnect (a coordinator gone for good stops receiving its share then). The registry is shared, so another
coordinator may commit a newer desired state of a device right after this one committed its own, and their
publications may reach the broker in either order. Each retained publication is therefore checked once the
broker has acknowledged it (`check_retained`): whatever the registry holds by then and differs is published
again (and checked in turn), so the state the broker retains last is the registry's. The check after the PUBACK
is what makes it sound: a state committed after the check is published after it too.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from server.metrics import FleetMetrics
from shared.config import BrokerConfig
from shared.errors import ConfigError
from shared.mqtt import make_client, parse_url

log = logging.getLogger("restnet.coordinator")

MAX_BATCH = 1000  # messages per registry commit
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    arrived: float  # time.monotonic() when paho handed it over


@dataclass
class Outgoing:
    topic: str
    payload: bytes
    retain: bool
    arrived: float | None = None  # set for answers to enrollments: feeds the assignment latency histogram


Handler = Callable[[Incoming, list[Outgoing], float], None]  # (message, what to publish, time.time())
Work = Callable[[list[Outgoing], float], object]  # a task: (what to publish, time.time()) -> its result
Transaction = Callable[[list[Incoming]], AbstractContextManager]  # one registry transaction for these messages
Check = Callable[[list[Outgoing]], list[Outgoing]]  # retained states the broker holds -> what to publish again


@dataclass
class _Task:
    fn: Work
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None
    waited: bool = False  # someone called `call` and reads the result or error


class Busy(Exception):
    """The worker did not get to a task in time."""


_STOP = object()


@dataclass(frozen=True)
class Sharing:
    """Several coordinators on the same device topics: the MQTT 5 shared-subscription group and session expiry."""
    group: str
    session_expiry_s: int


class MqttTransport:
    """Subscribes to `subscriptions`, runs `handle` for each message (a batch in one `transaction(batch)`) and
    `sweep` every `sweep_every` seconds; `on_new_session` runs as a task when the broker has no session of ours
    (it lost its state, retained messages included). With `sharing`, the subscriptions are shared and
    `check_retained` checks retained publications once the broker holds them."""

    def __init__(self, broker: BrokerConfig, client_id: str, subscriptions: list[str], transaction: Transaction,
                 handle: Handler, sweep: Work, sweep_every: float, on_new_session: Work, metrics: FleetMetrics,
                 sharing: Sharing | None = None, check_retained: Check | None = None):
        self.broker, self.client_id = broker, client_id
        self.transaction, self.handle, self.sweep, self.sweep_every = transaction, handle, sweep, sweep_every
        self.on_new_session, self.metrics, self.sharing, self.check_retained = on_new_session, metrics, sharing, \
            check_retained
        shared = [f"$share/{sharing.group}/{s}" for s in subscriptions] if sharing else []
        # A session kept from before a switch to (or from) sharing still holds the other form: drop it.
        self.subscriptions, self._stale_subscriptions = (shared, subscriptions) if sharing else (subscriptions, [])
        self._unchecked: list[tuple[mqtt.MQTTMessageInfo, Outgoing]] = []  # retained, not yet acknowledged
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="coordinator-worker", daemon=True)
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self.client: mqtt.Client | None = None

    def start(self) -> None:
        address = parse_url(self.broker.url)
        self._worker.start()
        username = self.client_id if self.broker.username else None  # each coordinator of a cluster has its own
        client, _ = make_client(self.broker, self.client_id, username, self.broker.password,
                                clean_session=False, mqtt5=self.sharing is not None)
        client.manual_ack_set(True)
        client.reconnect_delay_set(1, 10)
        client.on_connect, client.on_message = self._on_connect, self._on_message
        self.client = client
        session = {}
        if self.sharing is not None:
            expiry = Properties(PacketTypes.CONNECT)
            expiry.SessionExpiryInterval = self.sharing.session_expiry_s
            session = {"clean_start": False, "properties": expiry}
        try:
            client.connect(address.host, address.port, keepalive=30, **session)
        except OSError as exc:
            raise ConfigError(f"cannot reach the MQTT broker at {address.host}:{address.port}: {exc}",
                              "start the broker or fix broker.url") from None
        client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S) or self._connect_error:
            raise ConfigError(f"the MQTT broker refused the coordinator: {self._connect_error or 'no answer'}",
                              "check broker.username/password and the broker's ACL")

    def stop(self) -> None:
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(10)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def call(self, fn: Work, timeout: float = 60.0):
        """Run `fn(out, now)` on the worker inside its transaction; return its result or raise its error."""
        task = _Task(fn, waited=True)
        self._queue.put(task)
        if not task.done.wait(timeout):
            raise Busy("the coordinator's worker did not get to the task in time")
        if task.error is not None:
            raise task.error
        return task.result

    # ---- paho's thread: queue and return -----------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            self._connected.set()
            return
        client.subscribe([(s, 1) for s in self.subscriptions])
        if flags.session_present and self._stale_subscriptions:
            client.unsubscribe(self._stale_subscriptions)
        if not flags.session_present:
            self._queue.put(_Task(self.on_new_session))
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        self._queue.put(Incoming(msg.topic, msg.payload, msg.mid, msg.qos, time.monotonic()))

    # ---- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every
        stopping = False
        while not stopping:
            batch = []
            try:
                item = self._queue.get(timeout=0.25)
                while item is not _STOP:
                    batch.append(item)
                    if len(batch) == MAX_BATCH:
                        break
                    item = self._queue.get_nowait()
                stopping = item is _STOP
            except queue.Empty:
                pass
            messages = [item for item in batch if isinstance(item, Incoming)]
            if messages:
                self._run_messages(messages)
            for task in (item for item in batch if isinstance(item, _Task)):
                self._run_task(task)
            if time.monotonic() >= next_sweep:
                self._run_task(_Task(self.sweep))
                next_sweep = time.monotonic() + self.sweep_every
            if self.check_retained is not None:
                self._check_retained()

    def _run_messages(self, batch: list[Incoming]) -> None:
        """One transaction for the batch; commit, publish, then acknowledge every message of it."""
        out: list[Outgoing] = []
        now = time.time()
        try:
            with self.transaction(batch):
                for item in batch:
                    try:
                        self.handle(item, out, now)
                    except Exception:  # a bug or a broken catalog must not stop the other messages
                        log.exception("could not handle a message on %s", item.topic[:120])
                        self.metrics.rejected.labels("internal").inc()
        except Exception:  # the registry failed to commit: nothing is published, nothing acknowledged
            log.exception("registry commit failed; %d messages left for the broker to redeliver", len(batch))
            return
        self.metrics.batch_size.observe(len(batch))
        self._publish(out)
        for item in batch:
            if item.qos > 0:
                self.client.ack(item.mid, item.qos)

    def _run_task(self, task: _Task) -> None:
        """A task in a transaction of its own; what it produced is published after the commit."""
        out: list[Outgoing] = []
        try:
            with self.transaction([]):
                task.result = task.fn(out, time.time())
        except Exception as exc:  # reported to whoever submitted the task (a sweep: logged)
            task.error = exc
            if not task.waited:
                log.exception("a periodic task failed")
        else:
            self._publish(out)
        task.done.set()

    def _publish(self, out: list[Outgoing]) -> None:
        for o in out:
            info = self.client.publish(o.topic, o.payload, qos=1, retain=o.retain)
            if o.retain:
                self.metrics.desired_published.inc()
                if self.check_retained is not None:
                    self._unchecked.append((info, o))
            if o.arrived is not None:
                self.metrics.assignment_seconds.observe(time.monotonic() - o.arrived)

    def _check_retained(self) -> None:
        """Retained publications the broker has acknowledged, checked against the registry (see the module doc)."""
        held = [(info, o) for info, o in self._unchecked if info.is_published()]
        if not held:
            return
        try:
            with self.transaction([]):
                again = self.check_retained([o for _, o in held])
        except Exception:  # the registry is away: check them on the next round
            log.exception("cannot check %d retained states against the registry", len(held))
            return
        done = {id(info) for info, _ in held}
        self._unchecked = [(info, o) for info, o in self._unchecked if id(info) not in done]
        if again:
            log.info("another coordinator committed newer states of %d devices: published again", len(again))
        self._publish(again)
