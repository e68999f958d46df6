"""The catalog pipeline end to end on the tiny digits config, and its errors through the CLI."""
import json

import numpy as np
import pytest
import torch

from shared.artifacts import load_variant
from shared.catalog import Catalog
from shared.cli import main
from shared.costs import count_params
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
    assert main(["catalog", "show", str(tiny_catalog.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "restnet.catalog/1"
