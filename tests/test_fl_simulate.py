"""`restnet fl simulate` on Flower's real simulation engine (a SuperLink with --simulation, real Ray): the fleet's
ServerApp and ClientApp over 20 virtual devices of the tiny catalog, budgets cycled over the config's devices."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import yaml

from client.fl_client import HISTORY
from conftest import tiny_config_dict
from restnet.cli import main
from server.assignment import Assigner
from shared.artifacts import sha256_bytes, tensors_to_bytes
from shared.catalog import VariantRecord
from shared.messages import Profile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
N = 20


def _budgets(catalog, margin: float) -> list[dict]:
    """One budget class that nothing fits, then one just above each variant's need (distinct choices)."""
    assigner = Assigner(catalog.variants, margin)
    needs = sorted(n.memory_mb for n in assigner.needs.values())
    return [{"id": "tiny", "memory_mb": 0.01}] + [{"id": f"b{i}", "memory_mb": round(m + 0.01, 3)}
                                                  for i, m in enumerate(needs)]


def _config(tmp_path, catalog) -> tuple:
    cfg = tiny_config_dict()
    devices = _budgets(catalog, 0.2)
    cfg["fleet"] = {"memory_margin": 0.2, "devices": devices}
    cfg["federated"] = {"rounds": 2, "local_epochs": 1, "partition": {"kind": "dirichlet", "alpha": 1.0}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, devices


def test_simulation_runs_the_fleets_apps_over_virtual_devices(tiny_catalog, tmp_path, capsys):
    config, devices = _config(tmp_path, tiny_catalog)
    out = tmp_path / "sim"
    assert main(["fl", "simulate", "--config", str(config), "--catalog", str(tiny_catalog.root), "--devices", str(N),
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    run_dir = next(out.iterdir())
    results = json.loads((run_dir / "fl" / "results.json").read_text())

    assigner = Assigner(tiny_catalog.variants, 0.2)
    expected = {}  # virtual device -> variant id (or None), by the coordinator's rule
    for i in range(N):
        d = devices[i % len(devices)]
        choice = assigner.choose(Profile(memory_mb=d["memory_mb"], compute=1.0, agent_version="t"))
        expected[i] = choice.id if isinstance(choice, VariantRecord) else None
    by_variant = defaultdict(set)
    for i, vid in expected.items():
        if vid:
            by_variant[vid].add(i)
    assert None in expected.values() and by_variant  # some refused, some assigned

    for vid, members in by_variant.items():
        history = [json.loads(line) for line in (run_dir / "variants" / vid / HISTORY).read_text().splitlines()]
        for rnd in (1, 2):
            trained = {e["partition_id"] for e in history if e["round"] == rnd}
            assert trained == members, f"round {rnd} of {vid}: trained {sorted(trained)}, assigned {sorted(members)}"
        assert all(e["front_cached"] == (e["round"] == 2) for e in history)  # round 2 skipped the front
        records = [r for r in results["rounds"] if r["variant_id"] == vid]
        assert [r["round"] for r in records] == [1, 2]
        assert all(r["num_updates"] == r["num_nodes"] == len(members) and r["update_bytes"] > 0 for r in records)
        delivered = tiny_catalog.manifest(vid).stitch_block().sha256
        assert records[-1]["stitch_sha256"] != delivered  # the stitch weights changed
        assert vid in printed
    assert set(results["variants"]) == set(by_variant)  # no device ran a variant it was not assigned


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "at least one virtual device"),
    (["--devices", "5", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
])
def test_bad_input_is_one_line_saying_what_to_do(tiny_catalog, tmp_path, capsys, args, message):
    config, _ = _config(tmp_path, tiny_catalog)
    code = main(["fl", "simulate", "--config", str(config), "--catalog", str(tiny_catalog.root),
                 "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1


def test_an_unknown_config_is_named(tmp_path, capsys):
    assert main(["fl", "simulate", "--config", str(tmp_path / "nope.yaml"), "--devices", "3"]) != 0
    assert "nope.yaml not found" in capsys.readouterr().err
