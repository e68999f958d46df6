"""Validation and aggregation of stitching-layer updates, on plain tensors (no Flower processes)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from server.aggregation import Rejected, Update, aggregate_variant, checked_change, combine, fedavg, median, trimmed_mean
from shared.updates import SCALE, encode_delta
from shared.vocabulary import FLOAT16, INT8, UPDATE_FORMATS

VARIANT = "v-a"


def rejection(update, variant_id, current, norm_bound):
    """Why `update` may not count (None: it may)."""
    try:
        checked_change(update, variant_id, current, norm_bound)
    except Rejected as exc:
        return exc.reason
    return None


def current_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"proj.weight": torch.randn(8, 4, 1, 1, generator=g), "proj.bias": torch.randn(8, generator=g)}


def honest(current, seed: int, examples: int, node: int | None = None) -> Update:
    g = torch.Generator().manual_seed(seed)
    delta = {k: (0.05 * torch.randn(v.shape, generator=g)).half() for k, v in current.items()}
    return Update(node if node is not None else seed, VARIANT, delta, examples)


def zero_delta(current) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in current.items()}


def poisoned(current) -> dict[str, Update]:
    base = zero_delta(current)

    def with_(key, value, **kw):
        delta = dict(base)
        delta[key] = value
        return Update(kw.get("node", 100), kw.get("variant", VARIANT), delta, kw.get("examples", 50))

    w = base["proj.weight"]
    nan, inf = w.clone(), w.clone()
    nan[0, 0, 0, 0] = float("nan")
    inf[1, 1, 0, 0] = float("-inf")
    extra = dict(base, **{"other.weight": torch.zeros(2, dtype=torch.float16)})
    return {
        "nan": with_("proj.weight", nan),
        "inf": with_("proj.weight", inf),
        "wrong_shape": with_("proj.weight", torch.zeros(8, 5, 1, 1, dtype=torch.float16)),
        "wrong_dtype": with_("proj.weight", w.float()),  # float32 off the wire: not what a device sends
        "wrong_variant": Update(101, "v-b", dict(base), 50),
        "wrong_keys": Update(102, VARIANT, extra, 50),
        "norm": Update(103, VARIANT, {k: (1000.0 * v).half() for k, v in current.items()}, 50),
        "bad_examples": Update(104, VARIANT, dict(base), 0),
    }


def test_honest_update_passes_validation():
    cur = current_state()
    assert rejection(honest(cur, 1, 10), VARIANT, cur, norm_bound=100.0) is None


@pytest.mark.parametrize("reason", ["nan", "inf", "wrong_shape", "wrong_dtype", "wrong_variant", "wrong_keys",
                                    "norm", "bad_examples"])
def test_each_poisoned_update_is_rejected_with_its_reason(reason):
    cur = current_state()
    assert rejection(poisoned(cur)[reason], VARIANT, cur, norm_bound=100.0) == reason


def int8_update(current, node: int, scale_of=None, values_of=None) -> Update:
    """An honest int8 update, optionally with one scale tensor or value tensor replaced."""
    trained = {k: v + 0.05 for k, v in current.items()}
    wire = encode_delta(current, trained, INT8, seed=node)
    if scale_of is not None:
        wire["proj.weight" + SCALE] = scale_of(wire["proj.weight" + SCALE])
    if values_of is not None:
        wire["proj.weight"] = values_of(wire["proj.weight"])
    return Update(node, VARIANT, wire, 10, update_format=INT8)


@pytest.mark.parametrize("reason, update", [
    (None, lambda cur: int8_update(cur, 1)),
    ("nan", lambda cur: int8_update(cur, 2, scale_of=lambda s: s.fill_(float("nan")))),
    ("inf", lambda cur: int8_update(cur, 3, scale_of=lambda s: s.fill_(float("inf")),
                                    values_of=lambda q: q.fill_(1))),
    ("norm", lambda cur: int8_update(cur, 4, scale_of=lambda s: s * 1e6)),
    ("wrong_dtype", lambda cur: int8_update(cur, 5, values_of=lambda q: q.to(torch.int16))),
    ("wrong_shape", lambda cur: int8_update(cur, 6, scale_of=lambda s: s[:3])),
    ("wrong_keys", lambda cur: Update(7, VARIANT, zero_delta(cur), 10, update_format=INT8)),  # float16's keys
])
def test_int8_updates_are_decoded_then_checked_like_any_other(reason, update):
    cur = current_state()
    assert rejection(update(cur), VARIANT, cur, norm_bound=100.0) == reason


def test_int8_fedavg_is_the_weighted_mean_of_the_decoded_changes():
    from shared.updates import decode_delta

    cur = current_state()
    updates = [int8_update(cur, n) for n in (1, 2, 3)]
    for u, e in zip(updates, (10, 30, 60)):
        u.num_examples = e
    out = aggregate_variant(VARIANT, cur, updates, "fedavg").state
    for key in cur:
        expected = cur[key].double() + sum(decode_delta(u.delta, cur, INT8)[key].double() * u.num_examples
                                           for u in updates) / 100.0
        assert torch.allclose(out[key].double(), expected, atol=1e-6)


def test_missing_key_is_wrong_keys():
    cur = current_state()
    upd = Update(1, VARIANT, {"proj.weight": zero_delta(cur)["proj.weight"]}, 5)
    assert rejection(upd, VARIANT, cur, 100.0) == "wrong_keys"


def test_norm_bound_is_relative_to_current_weights():
    cur = current_state()
    ref = float(torch.sqrt(sum((v.double() ** 2).sum() for v in cur.values())))
    # A change of 2x the current norm: accepted under bound 3, rejected under bound 1.
    upd = Update(1, VARIANT, {k: (2.0 * v).half() for k, v in cur.items()}, 5)
    change = float(torch.sqrt(sum((d.double() ** 2).sum() for d in upd.delta.values())))
    assert change == pytest.approx(2 * ref, rel=1e-3)
    assert rejection(upd, VARIANT, cur, norm_bound=3.0) is None
    assert rejection(upd, VARIANT, cur, norm_bound=1.0) == "norm"


def test_all_zero_current_weights_use_an_absolute_bound():
    cur = {k: torch.zeros_like(v) for k, v in current_state().items()}
    small = Update(1, VARIANT, {k: torch.full(v.shape, 0.01, dtype=torch.float16) for k, v in cur.items()}, 5)
    huge = Update(2, VARIANT, {k: torch.full(v.shape, 1e3, dtype=torch.float16) for k, v in cur.items()}, 5)
    assert rejection(small, VARIANT, cur, 10.0) is None
    assert rejection(huge, VARIANT, cur, 10.0) == "norm"


def test_fedavg_weights_by_examples():
    a = {"w": torch.tensor([0.0, 2.0])}
    b = {"w": torch.tensor([4.0, 6.0])}
    out = fedavg([a, b], [1.0, 3.0])
    assert torch.equal(out["w"], torch.tensor([3.0, 5.0], dtype=torch.float64))  # accumulated and kept in float64


def test_trimmed_mean_drops_extremes_per_coordinate():
    states = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = trimmed_mean(states, trim_fraction=0.2)  # drops one from each end
    assert torch.allclose(out["w"], torch.tensor([3.0, -3.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        trimmed_mean(states, 0.5)


def test_median_odd_and_even():
    odd = [{"w": torch.tensor([v])} for v in (5.0, 1.0, 100.0)]
    even = [{"w": torch.tensor([v])} for v in (5.0, 1.0, 100.0, 3.0)]
    assert median(odd)["w"].item() == 5.0
    assert median(even)["w"].item() == 4.0


@pytest.mark.parametrize("n", [7, 8, 20])
def test_robust_aggregates_match_a_sorting_reference(n):
    g = torch.Generator().manual_seed(n)
    states = [{"w": torch.randn(3, 5, generator=g).round(decimals=1)} for _ in range(n)]  # rounding makes ties
    ordered = torch.sort(torch.stack([s["w"] for s in states]).double(), dim=0).values
    k = int(0.2 * n)
    assert torch.allclose(trimmed_mean(states, 0.2)["w"].double(), ordered[k:n - k].mean(dim=0), atol=1e-6)
    assert torch.allclose(median(states)["w"].double(), ordered[(n - 1) // 2: n // 2 + 1].mean(dim=0), atol=1e-6)


def test_combine_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown aggregation"):
        combine([{"w": torch.zeros(1)}], [1.0], "krum")


@pytest.mark.parametrize("method", ["fedavg", "trimmed_mean", "median"])
def test_poisoned_updates_are_counted_and_do_not_change_the_aggregate(method):
    cur = current_state()
    good = [honest(cur, s, examples=10 * s) for s in range(1, 6)]
    bad = list(poisoned(cur).values())
    mixed = aggregate_variant(VARIANT, cur, good[:2] + bad + good[2:], method=method, norm_bound=100.0)
    clean = aggregate_variant(VARIANT, cur, good, method=method, norm_bound=100.0)
    assert mixed.rejected == Counter({r: 1 for r in poisoned(cur)})
    assert [u.node_id for u in mixed.accepted] == [u.node_id for u in good]
    assert mixed.num_examples == sum(u.num_examples for u in good)
    for key in cur:
        assert torch.equal(mixed.state[key], clean.state[key])


def test_fedavg_aggregate_matches_the_weighted_mean_of_honest_updates():
    cur = current_state()
    good = [honest(cur, s, examples=e) for s, e in ((1, 10), (2, 30), (3, 60))]
    out = aggregate_variant(VARIANT, cur, good, "fedavg").state
    for key in cur:
        expected = cur[key].double() + sum(u.delta[key].double() * u.num_examples for u in good) / 100.0
        assert out[key].dtype == cur[key].dtype  # back in the dtype of the current weights
        assert torch.allclose(out[key].double(), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_robust_aggregates_shift_the_current_weights_by_the_robust_change(method):
    cur = current_state()
    good = [honest(cur, s, examples=10) for s in range(1, 6)]
    out = aggregate_variant(VARIANT, cur, good, method).state
    change = combine([u.delta for u in good], [1.0] * 5, method)
    for key in cur:
        assert torch.allclose(out[key].double(), cur[key].double() + change[key], atol=1e-6)


def test_no_accepted_update_keeps_current_weights_and_earlier_counts():
    cur = current_state()
    res = aggregate_variant(VARIANT, cur, [poisoned(cur)["nan"]], rejected=Counter({"node_error": 2}))
    assert res.accepted == [] and res.num_examples == 0
    assert res.rejected == Counter({"nan": 1, "node_error": 2})
    for key in cur:
        assert torch.equal(res.state[key], cur[key])
        assert res.state[key] is not cur[key]


# ------------------------------------------------------------------------------------------------------------------
# The ServerApp's round loop over an in-process grid: real ClientApp code and real Flower messages, no processes.


class InProcessGrid:
    """Delivers each message to a handler at once; `get_node_ids`/`push_messages`/`pull_messages` as a Grid."""

    def __init__(self, handlers):
        self.handlers, self.replies = handlers, {}

    def get_node_ids(self):
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.replies[msg.object_id] = self.handlers[msg.metadata.dst_node_id](msg)
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _device_handler(node_id, node_data):
    from flwr.app import Context, RecordDict

    from client.fl_client import app

    return lambda msg: app(msg, Context(run_id=7, node_id=node_id, node_config=node_data.to_node_config(),
                                        state=RecordDict(), run_config={}))


def _poisoner(kind, honest_handler, other_variant):
    """A node that answers queries honestly, then returns a poisoned change to the weights it was sent."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    def handle(msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return honest_handler(msg)
        received = {k: torch.from_numpy(a.numpy()) for k, a in msg.content.array_records["stitch"].items()}
        delta = zero_delta(received)
        variant = str(msg.content.config_records["config"]["variant-id"])
        key = max(delta)
        if kind == "nan":
            delta[key].fill_(float("nan"))
        elif kind == "inf":
            delta[key].fill_(float("inf"))
        elif kind == "wrong_shape":
            delta[key] = torch.zeros(delta[key].numel() + 1, dtype=torch.float16)
        elif kind == "wrong_dtype":
            delta[key] = delta[key].float()
        elif kind == "norm":
            delta = {k: (1000.0 * v).half() for k, v in received.items()}
        elif kind == "wrong_variant":
            variant = other_variant
        content = RecordDict({"stitch-delta": ArrayRecord(delta), "metrics": MetricRecord({"num-examples": 10_000}),
                              "variant": ConfigRecord({"variant-id": variant})})
        if kind == "newer_format":  # a device of a later release
            content.config_records["variant"]["update-format"] = "delta-float16/2"
        elif kind == "weights_not_delta":  # a device from before deltas: its trained float32 weights as `stitch`
            content = RecordDict({"stitch": ArrayRecord({k: (v * 1000).float() for k, v in received.items()}),
                                  "metrics": MetricRecord({"num-examples": 10_000}),
                                  "variant": ConfigRecord({"variant-id": variant})})
        return Message(content, reply_to=msg)

    return handle


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps new messages with the identity of the process's task; give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_settings(catalog, data, output_dir, coordinator_url="", token="", **federated):
    """The ServerApp's settings as `restnet fl run` makes them, for a fleet config with these federated settings."""
    from server.run_config import RunSettings, run_config
    from shared.config import Config, FederatedConfig, FleetConfig

    cfg = Config(data=data, fleet=FleetConfig(api_token=token or None),
                 federated=FederatedConfig(query_timeout_s=5, round_timeout_s=5, **federated))
    return RunSettings.from_run_config(run_config(cfg, catalog, output_dir, coordinator_url))


@pytest.mark.slow
def test_server_round_rejects_poisoned_replies_and_keeps_the_honest_aggregate(tiny_catalog, tmp_path, task_identity):
    from fleet_helpers import install_from_catalog
    from shared.node_data import NodeData
    from server.fl_server import run_federation
    from shared.config import DataConfig, PartitionConfig

    vid, other = tiny_catalog.variants[0].id, tiny_catalog.variants[1].id
    data = DataConfig(dataset="digits", image_size=32, channels=1)

    def node(i, n):
        nd = NodeData(tmp_path / f"dev{i}", data, i, n, PartitionConfig("dirichlet", 0.5, 0))
        install_from_catalog(tiny_catalog, vid, nd.device_dir)
        return nd

    def settings(out):
        return run_settings(tiny_catalog.root, data, tmp_path / out, rounds=1, local_epochs=1, lr=0.02)

    honest = {100 + i: _device_handler(100 + i, node(i, 2)) for i in range(2)}
    kinds = ("nan", "inf", "wrong_shape", "wrong_dtype", "wrong_variant", "norm", "newer_format",
             "weights_not_delta")
    reasons = {"newer_format": "incompatible", "weights_not_delta": "incompatible"}
    handlers = dict(honest)
    for k, kind in enumerate(kinds):
        handlers[200 + k] = _poisoner(kind, honest[100], other)

    mixed = run_federation(InProcessGrid(handlers), settings("mixed"), run_id=7)
    clean = run_federation(InProcessGrid(honest), settings("clean"), run_id=8)

    (rec,) = mixed["rounds"]
    assert rec["variant_id"] == vid and rec["num_nodes"] == 2 + len(kinds) and rec["num_updates"] == 2
    assert rec["rejected"] == dict(Counter(reasons.get(kind, kind) for kind in kinds))
    assert rec["stitch_sha256"] == clean["rounds"][0]["stitch_sha256"]  # bit-identical to the honest-only run
    # the same outcome as the honest-only run: published (a file) only when no worse than the delivered stitch
    assert mixed["variants"][vid] == clean["variants"][vid]
    if clean["variants"][vid]["improved"]:
        assert (tmp_path / "mixed" / f"{vid}.safetensors").read_bytes() == \
            (tmp_path / "clean" / f"{vid}.safetensors").read_bytes()
    assert 0.0 <= rec["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("update_format", [FLOAT16, INT8])
def test_server_reports_each_round_and_hands_the_new_stitch_to_the_coordinator(tiny_catalog, tmp_path,
                                                                                task_identity, update_format):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from fleet_helpers import install_from_catalog
    from shared.node_data import NodeData
    from server.fl_server import run_federation
    from shared.artifacts import bytes_to_tensors, sha256_bytes, tensors_to_bytes
    from shared.config import DataConfig, PartitionConfig

    posts = []

    class Coordinator(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append((self.path, self.headers.get("Authorization"), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"version": 2}')

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Coordinator)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    vid = tiny_catalog.variants[0].id
    data = DataConfig(dataset="digits", image_size=32, channels=1)
    handlers = {}
    for i in range(2):
        node = NodeData(tmp_path / f"dev{i}", data, i, 2, PartitionConfig("iid", 0.5, 0))
        install_from_catalog(tiny_catalog, vid, node.device_dir)
        handlers[10 + i] = _device_handler(10 + i, node)
    encoding = next(k for k, v in UPDATE_FORMATS.items() if v == update_format)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    settings = run_settings(tiny_catalog.root, data, tmp_path / "out", url, "s3cret",
                            rounds=2, update_encoding=encoding)
    try:
        results = run_federation(InProcessGrid(handlers), settings, run_id=42)
    finally:
        httpd.shutdown()

    assert all(auth == "Bearer s3cret" for _, auth, _ in posts)
    reports = [json.loads(body) for path, _, body in posts if path == "/api/fl/report"]
    assert [(r["round"], r["variant_id"]) for r in reports] == [(1, vid), (2, vid)]
    for r in reports:  # exactly the coordinator's report schema
        assert set(r) == {"run_id", "round", "variant_id", "accuracy", "num_updates", "rejected", "update_bytes"}
        assert r["run_id"] == "42" and r["num_updates"] == 2 and r["rejected"] == {} and r["update_bytes"] > 0
    (path, _, body), = [p for p in posts if p[0].startswith("/api/variants/")]
    url = urlparse(path)
    assert url.path == f"/api/variants/{vid}/stitch"
    assert float(parse_qs(url.query)["accuracy"][0]) == pytest.approx(results["variants"][vid]["accuracy"], abs=1e-6)
    assert int(parse_qs(url.query)["base_version"][0]) == tiny_catalog.get(vid).version
    assert sha256_bytes(tensors_to_bytes(bytes_to_tensors(body))) == results["variants"][vid]["stitch_sha256"]
    assert results["settings"]["coordinator_token"] == "***"  # the secret is not written to results.json


def test_a_device_refuses_a_request_for_an_update_format_it_cannot_send():
    from client.fl_client import TrainRequest
    from shared.errors import RestnetError
    request = {"variant-id": VARIANT, "version": 3, "round": 1, "local-epochs": 1, "learning-rate": 0.1,
               "batch-size": 8}
    assert TrainRequest.from_record({**request, "update-format": FLOAT16}).version == 3
    assert TrainRequest.from_record({**request, "update-format": INT8}).update_format == INT8
    assert TrainRequest.from_record(request).update_format == FLOAT16  # the release before formats were named
    with pytest.raises(RestnetError, match="delta-float16/9"):
        TrainRequest.from_record({**request, "update-format": "delta-float16/9"})


def test_the_reply_format_is_read_from_what_a_device_sent():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from server.fl_server import reply_format
    delta = ArrayRecord({"w": torch.zeros(2, dtype=torch.float16)})
    assert reply_format(RecordDict({"stitch-delta": delta, "variant": ConfigRecord(
        {"variant-id": VARIANT, "update-format": FLOAT16})})) == FLOAT16
    assert reply_format(RecordDict({"stitch-delta": delta, "variant": ConfigRecord({"variant-id": VARIANT})})) \
        == FLOAT16
    assert reply_format(RecordDict({"stitch": ArrayRecord({"w": torch.zeros(2)})})) != FLOAT16
