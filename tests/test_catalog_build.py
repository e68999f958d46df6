"""The catalog pipeline end to end on the tiny digits config, and its errors through the CLI."""
import json

import numpy as np
import pytest
import torch

from restnet.cli import main
from shared.build import build_catalog
from shared.catalog import Catalog
from shared.config import parse_config
from shared.costs import count_macs, count_params
from shared.variants import build_stitched_model, load_variant
from shared.selection import select
from tests.conftest import tiny_config_dict


def test_catalog_records_describe_real_models(tiny_catalog):
    again = Catalog.load(tiny_catalog.root)
    assert [v.to_dict() for v in again.variants] == [v.to_dict() for v in tiny_catalog.variants]
    for rec in again.variants:
        model = load_variant(again.manifest(rec.id), again.store)
        assert rec.params == count_params(model)
        assert rec.trainable_params == count_params(model.stitch)
        assert rec.memory_bytes > 4 * rec.params
        assert rec.finetune_memory_bytes > 0 and rec.flops > 0
        assert rec.macs == count_macs(model, torch.zeros(1, *again.input_shape)) == rec.flops // 2
        assert 0.0 <= rec.accuracy_init <= 1.0 and 0.0 <= rec.accuracy <= 1.0
        assert rec.budgets and rec.version == 1
        x = torch.randn(2, *again.input_shape)
        assert model(x).shape == (2, again.num_classes)


def test_each_variant_is_the_highest_cka_pair_within_its_budget_band(tiny_catalog):
    doc = tiny_catalog.load_cka()
    cka = np.array([[np.nan if v is None else v for v in row] for row in doc["matrix"]])
    cost = np.array(doc["cost"])
    assert cka.shape == (len(tiny_catalog.front.block_names) - 1, len(tiny_catalog.behind.block_names) - 1)
    lower_of = dict(zip(doc["budgets"], [doc["budget_floor"]] + doc["budgets"][:-1]))
    for rec in tiny_catalog.variants:
        for budget in rec.budgets:
            band = np.where(cost > lower_of[budget], cost, np.inf)
            assert select(cka, band, budget) == (rec.front_cut - 1, rec.behind_cut - 1)
            assert lower_of[budget] < rec.params <= budget  # params budgets are exact
    # the default sweep spans the two base models, as the paper's variants do
    assert doc["budget_floor"] == min(tiny_catalog.front.params, tiny_catalog.behind.params)
    assert doc["budgets"][-1] == max(tiny_catalog.front.params, tiny_catalog.behind.params)


def write_config(tmp_path, **changes):
    import yaml

    cfg = tiny_config_dict()
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("changes, message", [
    ({"large__name": "resnet_9000"}, "unknown model 'resnet_9000'"),
    ({"large__name": "coat_tiny", "large__kwargs": {}}, "cannot split coat_tiny"),  # blocks pass 2+ tensors
    ({"large__checkpoint": "/nonexistent/large.safetensors"}, "checkpoint /nonexistent/large.safetensors not found"),
    ({"large__train": None, "small__train": None, "catalog__budgets": [1000.0]}, "no stitched variant fits"),
    ({"large__name": "resnet18", "large__pretrained": True, "large__kwargs": {}, "large__train": None},
     "could not download pretrained weights"),
    ({"small__name": "deit_tiny_patch16_224", "small__kwargs": {}}, "cannot take input of shape (1, 32, 32)"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(tmp_path, capsys, changes, message):
    code = main(["catalog", "build", "--config", write_config(tmp_path, **changes), "--out", str(tmp_path / "o"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("error: ") and message.lower() in err[-1].lower(), err[-3:]


def test_catalog_show_prints_every_variant(tiny_catalog, capsys):
    assert main(["catalog", "show", str(tiny_catalog.root)]) == 0
    out = capsys.readouterr().out
    assert all(v.id in out for v in tiny_catalog.variants)
    header = out.splitlines()[0].split()
    assert header[header.index("flops") + 1] == "macs"
    assert f"{tiny_catalog.front.macs / 1e6:.1f}M" in out
    assert main(["catalog", "show", str(tiny_catalog.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "restnet.catalog/1"


def test_catalogs_and_manifests_from_before_macs_and_kernel_sizes_still_load(tiny_catalog, tmp_path):
    doc = tiny_catalog.to_dict()
    for record in [doc["front"], doc["behind"], *doc["variants"]]:
        del record["macs"]
    (tmp_path / "catalog.json").write_text(json.dumps(doc))
    old = Catalog.load(tmp_path)
    assert [v.macs for v in old.variants] == [v.flops // 2 for v in tiny_catalog.variants]
    assert old.front.macs == tiny_catalog.front.macs
    architecture = tiny_catalog.manifest(tiny_catalog.variants[0].id).architecture
    assert architecture["stitch"].pop("kernel_size") == 1
    stitch = build_stitched_model(architecture).stitch
    assert stitch.kernel_size == 1 and stitch.proj.kernel_size == (1, 1) and stitch.proj.bias is not None


def test_a_3x3_stitch_catalog_builds_travels_and_rebuilds(tmp_path):
    """`catalog.stitch_kernel_size: 3` end to end, kept quick: untrained base models, no fine-tuning."""
    cfg = tiny_config_dict()
    cfg["large"]["train"] = cfg["small"]["train"] = None
    cfg["catalog"].update(stitch_kernel_size=3, sweep=2, measure_latency=False, finetune={"epochs": 0})
    catalog = build_catalog(parse_config(cfg, "test"), tmp_path, progress=False, log=lambda m: None).catalog
    assert catalog.variants
    for rec in catalog.variants:
        manifest = catalog.manifest(rec.id)
        assert manifest.architecture["stitch"]["kernel_size"] == 3
        model = load_variant(manifest, catalog.store)
        src, dst = model.stitch.src, model.stitch.dst
        assert model.stitch.proj.kernel_size == (3, 3) and model.stitch.proj.bias is None
        assert rec.trainable_params == count_params(model.stitch) == 9 * src.channels * dst.channels
        assert rec.params == count_params(model)


def test_the_paper_cka_estimator_builds_a_catalog_and_cka_json_names_it(tmp_path):
    """`data.calibration.estimator: paper`, kept quick: untrained base models, no fine-tuning."""
    cfg = tiny_config_dict()
    cfg["large"]["train"] = cfg["small"]["train"] = None
    cfg["catalog"].update(sweep=2, measure_latency=False, finetune={"epochs": 0})
    docs = {}
    for estimator in ("unbiased", "paper"):
        cfg["data"]["calibration"]["estimator"] = estimator
        catalog = build_catalog(parse_config(cfg, "test"), tmp_path / estimator, progress=False,
                                log=lambda m: None).catalog
        assert catalog.variants
        docs[estimator] = catalog.load_cka()
    assert "unbiased HSIC" in docs["unbiased"]["estimator"] and "biased HSIC" in docs["paper"]["estimator"]
    paper = np.array([[np.nan if v is None else v for v in row] for row in docs["paper"]["matrix"]])
    unbiased = np.array([[np.nan if v is None else v for v in row] for row in docs["unbiased"]["matrix"]])
    assert np.nanmin(paper) >= 0.0 and np.nanmax(paper) <= 1.0 + 1e-9
    assert not np.allclose(paper, unbiased, equal_nan=True)
