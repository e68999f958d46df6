"""`restnet experiment NAME`: each of the paper's experiments end to end on a tiny config, sharing one output
folder so the base models and calibration activations are computed once and reused."""
import json

import numpy as np
import pytest
import yaml

from restnet.cli import main
from shared.vocabulary import STRATEGIES
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

SEEDS = 3


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """A config whose base models train for one epoch on small widths; fine-tuning one short epoch."""
    root = tmp_path_factory.mktemp("experiments")
    cfg = tiny_config_dict()
    cfg["large"].update(kwargs={"width": 0.125}, train={"epochs": 1, "lr": 0.05, "batch_size": 64})
    cfg["small"].update(kwargs={"width": 0.0625}, train={"epochs": 1, "lr": 0.05, "batch_size": 64})
    cfg["data"]["calibration"] = {"examples": 48, "repeats": 2}
    cfg["catalog"].update(measure_latency=False, finetune={"epochs": 1, "lr": 0.02, "batch_size": 128})
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"config": str(path), "out": root / "out"}


def run(exp, name, *extra):
    return main(["experiment", name, "--config", exp["config"], "--out", str(exp["out"]), "--quiet",
                 "--seeds", str(SEEDS), "--budgets", "3", *extra])


def outputs(exp, name) -> dict:
    out = exp["out"]
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / f"{name}.md").read_text()
    assert "359 validation examples" in md and "| --- |" not in md and md.count("\n|---") >= 1
    if name != "heatmaps":  # the only one without accuracies
        assert f"over {SEEDS} seeds" in md
    return json.loads((out / f"{name}.json").read_text())


def check_spread(acc: dict) -> None:
    assert len(acc["values"]) == SEEDS
    assert acc["min"] <= acc["mean"] <= acc["max"]
    assert acc["mean"] == pytest.approx(np.mean(acc["values"]))
    assert acc["std"] == pytest.approx(np.std(acc["values"], ddof=1))


def test_directions_compares_both_directions_at_the_same_budgets(exp, capsys):
    assert run(exp, "directions") == 0
    r = outputs(exp, "directions")
    assert {row["direction"] for row in r["rows"]} == {"slow_to_fast", "fast_to_slow"}
    for row in r["rows"]:
        check_spread(row["accuracy"])
        front = row["variant"].split(".")[0]
        assert front == ("cifar_vgg13" if row["direction"] == "slow_to_fast" else "cifar_vgg11")
        assert all(b in r["budgets"] for b in row["budgets"]) and row["params"] <= max(row["budgets"])
    for m in r["matched"]:
        both = {row["direction"]: row for row in r["rows"] if m["budget"] in row["budgets"]}
        assert m["difference"] == pytest.approx(both["slow_to_fast"]["accuracy"]["mean"]
                                                - both["fast_to_slow"]["accuracy"]["mean"])
    assert r["summary"]["matched_budgets"] == len(r["matched"])
    assert "Slow-to-Fast variant" in capsys.readouterr().out


def test_the_second_experiment_reuses_the_cached_base_models_and_activations(exp, capsys):
    assert run(exp, "strategies", "--variants", "1") == 0  # whole-model runs are the slow ones
    err = capsys.readouterr().err
    assert "reusing the base models" in err and "reusing the calibration activations" in err
    assert "training" not in err
    r = outputs(exp, "strategies")
    variants = list(dict.fromkeys(row["variant"] for row in r["rows"]))
    assert len(variants) == 1
    for vid in variants:
        rows = {row["strategy"]: row for row in r["rows"] if row["variant"] == vid}
        assert set(rows) == set(STRATEGIES)
        assert len({row["accuracy_init"] for row in rows.values()}) == 1  # the same least-squares start
        trainable = {k: v["trainable_params"] for k, v in rows.items()}
        assert trainable["stitch"] == rows["stitch"]["stitch_params"] < trainable["stitch+behind"] < trainable["full"]
        assert trainable["full"] == rows["full"]["params"]
        for row in rows.values():
            check_spread(row["accuracy"])


def test_cka_vs_accuracy_reports_both_estimators_and_their_stitch_points(exp):
    assert run(exp, "cka-vs-accuracy", "--points", "5") == 0
    r = outputs(exp, "cka-vs-accuracy")
    assert len(r["rows"]) == 5
    ckas = [row["cka"] for row in r["rows"]]
    assert ckas == sorted(ckas) and ckas[-1] - ckas[0] > 0.2  # spread over the range
    for est in ("unbiased", "paper", "params"):
        assert set(r["correlation"][est]) == {"spearman", "pearson"}
    assert len(r["stitch_points"]) == 3
    assert r["summary"]["same_stitch_points"] == sum(p["unbiased"] == p["paper"] for p in r["stitch_points"])


def test_heatmaps_hold_the_cross_model_each_models_own_and_a_stitched_variants_cka(exp):
    assert run(exp, "heatmaps") == 0
    r = outputs(exp, "heatmaps")
    cross, large, small, stitched = r["matrices"]
    assert len(cross["matrix"]) == len(large["matrix"]) and len(cross["matrix"][0]) == len(small["matrix"])
    for m in (large, small, stitched):
        assert np.allclose(np.diag(np.array(m["matrix"], dtype=float)), 1.0)
    assert "stitch" in stitched["rows"]


def test_a_spread_of_equal_accuracies_has_that_mean():
    """The float mean of three equal values can round past them (35/359 x 3 does): a report's mean stays within
    its min and max."""
    from shared.experiments import spread

    acc = spread([35 / 359] * 3)
    assert acc["min"] <= acc["mean"] <= acc["max"] and acc["std"] == pytest.approx(0.0, abs=1e-12)
