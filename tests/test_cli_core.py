"""The core commands other than `catalog build`: cka, train-base, stitch-train."""
import json

import yaml

from shared.catalog import Catalog
from restnet.cli import main
from tests.conftest import tiny_config_dict


def write_config(tmp_path, cfg=None):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg or tiny_config_dict()))
    return str(p)


def test_cka_writes_the_matrix_and_a_heatmap(tmp_path, capsys):
    cfg = tiny_config_dict()
    cfg["large"]["train"] = cfg["small"]["train"] = None  # CKA of untrained models is still defined
    assert main(["cka", "--config", write_config(tmp_path, cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "o" / "cka.json").read_text())
    assert len(doc["matrix"]) == len(doc["rows"]) and len(doc["matrix"][0]) == len(doc["cols"])
    assert all(v is None or -1.0 <= v <= 1.0 + 1e-9 for row in doc["matrix"] for v in row)
    assert (tmp_path / "o" / "cka.png").read_bytes()[:4] == b"\x89PNG"


def test_train_base_saves_a_checkpoint_that_loads(tmp_path, capsys):
    assert main(["train-base", "--config", write_config(tmp_path), "--role", "small", "--out", str(tmp_path),
                 "--quiet"]) == 0
    ckpt = tmp_path / "checkpoints" / "small.safetensors"
    assert ckpt.is_file() and not (tmp_path / "checkpoints" / "large.safetensors").exists()
    cfg = tiny_config_dict()
    cfg["small"]["checkpoint"], cfg["small"]["train"] = str(ckpt), None
    from shared.build import prepare_bases
    from shared.config import parse_config
    from shared.datasets import load_splits

    c = parse_config(cfg, "test")
    train, val = load_splits(c.data)
    c.large.train = None
    acc = prepare_bases(c, train, val, tmp_path / "x", False, lambda m: None)["small"][2]
    assert acc > 0.5  # the trained weights came back (an untrained model is at ~0.1)


def test_stitch_train_improves_or_keeps_and_saves_a_new_version(tiny_catalog, tmp_path, capsys):
    import shutil

    root = tmp_path / "cat"
    shutil.copytree(tiny_catalog.root, root)
    vid = tiny_catalog.variants[0].id
    assert main(["stitch-train", "--config", write_config(tmp_path), "--catalog", str(root), "--variant", vid,
                 "--epochs", "1", "--save", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"saved {vid} version 2" in out
    again = Catalog.load(root)
    assert again.get(vid).version == 2 and again.manifest(vid).version == 2
    code = main(["stitch-train", "--config", write_config(tmp_path), "--catalog", str(root), "--variant", "nope"])
    assert code == 2 and "no variant 'nope'" in capsys.readouterr().err
