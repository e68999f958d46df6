"""Our ClientApp, run inside the device's long-running agent process for its SuperNode.

Flower 1.41 runs a ClientApp as a new `flwr-clientapp` process for every message (its `flower-superexec` polls the
SuperNode for tasks and starts one process per task, in either isolation mode). For stitch-only training that
process costs far more than the work: starting Python and Flower, importing torch and timm, loading the variant,
against well under a second of training (`benchmarks/round_bench.py`). A SuperNode started with
`--isolation process` leaves the polling to whoever connects to its local runtime API; `ClientAppHost` is that
executor, inside the agent: it takes the SuperNode's tasks one at a time and runs them through our `ClientApp`
object in this process, where torch is imported once and the variants stay loaded between rounds.

It speaks the SuperNode's runtime API with Flower's own client and message helpers (the same calls
`flwr-clientapp` makes), without the parts of Flower's task process that belong to a process of its own: no
signal handlers, no exit, no SIGINT on a refused heartbeat or token (Flower's task process interrupts itself
there; here that would stop the agent). The device runs the ClientApp it has installed, never code from the
wire: a run whose app bundle is not this release's `restnet-fleet` app is answered with an error.
"""
from __future__ import annotations

import logging
import threading
import time
from importlib.metadata import version

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (AcquireTaskRequest, PullAppMessagesRequest,  # pylint: disable=E0611
                                    PullTaskInputRequest, SendTaskHeartbeatRequest)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                 make_pull_object_fn_protobuf)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from shared.errors import RestnetError

log = logging.getLogger(__name__)

APP_NAME = "restnet-fleet"  # [project] name in pyproject.toml: the bundle's id is "<publisher>/<name>"
POLL_S = 0.05  # how often an idle host asks its SuperNode for a task (Flower's superexec: every 1 s)
# A task is often handed out before the SuperNode holds every part of its message (it fetches them from the
# SuperLink); Flower's pull then first waits 1 s, longer than a whole stitch-only round here.
PART_RETRY_S = 0.02
_task = threading.local()  # the task this thread runs: when it was acquired


def task_acquired_at() -> float | None:
    """When the host running the calling thread's task acquired it; None outside a host (a ClientApp process)."""
    return getattr(_task, "acquired_at", None)


def _runtime_client(address: str, *interceptors) -> RuntimeHttpClient:
    """A plain client of the SuperNode's local runtime API: without Flower's retry invoker, which on a 401 sends
    SIGINT to its own process."""
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=list(interceptors))


def check_app_bundle(fab_id: str, fab_version: str) -> None:
    """The run must be this release of our app: the device runs its own ClientApp, so another app (or another
    release of ours, whose messages may differ) is refused rather than run with the wrong code."""
    ours = version(APP_NAME)
    if fab_id.split("/")[-1] != APP_NAME or fab_version != ours:
        raise RestnetError(f"the run's app is {fab_id} {fab_version}; this device runs {APP_NAME} {ours}",
                           "run the same restnet-fleet release on the server and the devices")


class ClientAppHost:
    """Serves one SuperNode's tasks with `app` in this process, on a thread, one task at a time."""

    def __init__(self, runtime_address: str, app: ClientApp, name: str = "device"):
        self.address, self.app, self.name = runtime_address, app, name
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=f"clientapp {name}", daemon=True)

    def start(self) -> "ClientAppHost":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking tasks; a task in progress finishes (or is abandoned after `timeout` seconds)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _serve(self) -> None:
        client = _runtime_client(self.address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        try:
            while not self.stopped.is_set():
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.HTTPError as exc:  # the SuperNode is starting, restarting or gone: ask again
                    log.debug("%s: runtime API not reachable: %s", self.name, exc)
                    self.stopped.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    _task.acquired_at = time.time()
                    try:
                        self.run_task(res.token)
                    except Exception:  # noqa: BLE001 - one task going wrong must not end the device's FL
                        log.exception("%s: a task ended badly; taking the next one", self.name)
                else:
                    self.stopped.wait(POLL_S)
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """One task: pull the message and context, run the app, push the reply and the task's final status.
        Mirrors `flwr-clientapp` (an exception becomes an error reply and a failed task), minus its process exit."""
        client = _runtime_client(self.address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                 RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(lambda: self._heartbeat(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run = self._pull_input(client)
            heartbeat.start()  # after the pull, not racing it: a task is kept alive while the app runs
            check_app_bundle(run.fab_id, run.fab_version)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - any failure of the app is the task's failure, not the host's
            log.error("%s: ClientApp task failed: %s", self.name, exc, exc_info=not isinstance(exc, RestnetError))
            details = f"{type(exc)}:<'{exc}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001 - the SuperNode reports the missing reply to the server
                log.error("%s: could not push the reply: %s", self.name, exc)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    @staticmethod
    def _pull_input(client: RuntimeHttpClient):
        """The task's context, run and message from the SuperNode (what Flower's `pull_task_input` does, without
        the app bundle, which this host never runs, and retrying a part not there yet after 20 ms, not 1 s)."""
        task = client.PullTaskInput(PullTaskInputRequest())
        context, run = context_from_proto(task.context), run_from_proto(task.run)
        tree = client.PullMessages(PullAppMessagesRequest()).message_object_trees[0]
        node = Node(node_id=context.node_id)
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, initial_backoff=PART_RETRY_S, backoff_cap=1.0)
        message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message does not carry its own id
        return message, context, run

    @staticmethod
    def _heartbeat(client: RuntimeHttpClient) -> bool:
        """True when the SuperNode heard it; a task the SuperNode no longer knows just stops being kept alive
        (Flower's task process interrupts itself here)."""
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

