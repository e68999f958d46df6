"""The coordinator's MQTT side: a persistent session, one worker thread, group commit, then publish and PUBACK.

paho's network loop only queues what arrives. One worker thread owns every registry write: it drains the queue in
batches, hands each message to `handle` inside one registry transaction (group commit), and only after the commit
publishes what the batch produced and acknowledges the batch's messages (manual PUBACK). So an answer a device has
seen is always in the registry, and a message not yet committed when the coordinator died is redelivered by the
broker to the coordinator's persistent session when it comes back.

Work that must run under the same rules (it writes the registry and may publish) is queued as a task with `call`.
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


@dataclass
class _Task:
    fn: Work
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class Busy(Exception):
    """The worker did not get to a task in time."""


_STOP = object()


class MqttTransport:
    """Subscribes to `subscriptions`, runs `handle` for each message and `sweep` every `sweep_every` seconds,
    all inside `transaction()`; `on_new_session` runs as a task when the broker has no session of ours (it lost
    its state, retained messages included)."""

    def __init__(self, broker: BrokerConfig, client_id: str, subscriptions: list[str],
                 transaction: Callable[[], AbstractContextManager], handle: Handler, sweep: Work, sweep_every: float,
                 on_new_session: Work, metrics: FleetMetrics):
        self.broker, self.client_id, self.subscriptions = broker, client_id, subscriptions
        self.transaction, self.handle, self.sweep, self.sweep_every = transaction, handle, sweep, sweep_every
        self.on_new_session, self.metrics = on_new_session, metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="coordinator-worker", daemon=True)
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self.client: mqtt.Client | None = None

    def start(self) -> None:
        address = parse_url(self.broker.url)
        self._worker.start()
        client, _ = make_client(self.broker, self.client_id, self.broker.username, self.broker.password,
                                clean_session=False)
        client.manual_ack_set(True)
        client.reconnect_delay_set(1, 10)
        client.on_connect, client.on_message = self._on_connect, self._on_message
        self.client = client
        try:
            client.connect(address.host, address.port, keepalive=30)
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
        task = _Task(fn)
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
            sweep = time.monotonic() >= next_sweep
            if batch or sweep:
                self._run_batch(batch, sweep)
            if sweep:
                next_sweep = time.monotonic() + self.sweep_every

    def _run_batch(self, batch: list, sweep: bool) -> None:
        out: list[Outgoing] = []
        now = time.time()
        try:
            with self.transaction():
                for item in batch:
                    if isinstance(item, _Task):
                        try:
                            item.result = item.fn(out, now)
                        except Exception as exc:  # reported to whoever submitted the task
                            item.error = exc
                    else:
                        try:
                            self.handle(item, out, now)
                        except Exception:  # a bug or a broken catalog must not stop the other messages
                            log.exception("could not handle a message on %s", item.topic[:120])
                            self.metrics.rejected.labels("internal").inc()
                if sweep:
                    self.sweep(out, now)
        except Exception:  # the registry failed to commit: nothing is published, nothing acknowledged
            log.exception("registry commit failed; %d messages left for the broker to redeliver", len(batch))
            for item in batch:
                if isinstance(item, _Task):
                    item.error = item.error or RuntimeError("registry commit failed")
                    item.done.set()
            return
        if batch:
            self.metrics.batch_size.observe(len(batch))
        for o in out:
            self.client.publish(o.topic, o.payload, qos=1, retain=o.retain)
            if o.retain:
                self.metrics.desired_published.inc()
            if o.arrived is not None:
                self.metrics.assignment_seconds.observe(time.monotonic() - o.arrived)
        for item in batch:
            if isinstance(item, _Task):
                item.done.set()
            elif item.qos > 0:
                self.client.ack(item.mid, item.qos)
