"""Datasets and device partitions."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from shared.config import DataConfig
from shared.datasets import calibration_batches, load_splits, partition_indices
from shared.errors import ConfigError


def test_digits_splits_are_normalised_stratified_and_disjoint():
    train, val = load_splits(DataConfig(dataset="digits", image_size=16, channels=3))
    assert train.tensors[0].shape[1:] == (3, 16, 16)
    assert len(train) + len(val) == 1797
    assert set(train.tensors[1].tolist()) == set(val.tensors[1].tolist()) == set(range(10))
    assert abs(train.tensors[0].mean().item()) < 1e-3
    tr = {tuple(x.flatten()[:32].tolist()) for x in train.tensors[0][:200]}
    assert len(tr) > 150  # real, varied images


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_cover_every_example_once(kind):
    labels = np.repeat(np.arange(10), 50)
    parts = partition_indices(labels, 7, kind, alpha=0.3, seed=1)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))


def test_dirichlet_with_small_alpha_is_skewed_and_iid_is_not():
    labels = np.repeat(np.arange(10), 100)

    def top_class_share(parts):  # how much of a device's data is its most common class
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])

    assert top_class_share(partition_indices(labels, 5, "iid")) < 0.2
    assert top_class_share(partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0)) > 0.4


def test_imagefolder_from_a_small_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            arr = (rng.uniform(size=(12 + i, 10 + 2 * i, 3)) * 255).astype("uint8")  # sizes differ
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    train, val = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.34))
    assert train.tensors[0].shape[1:] == (3, 8, 8)
    assert len(train) + len(val) == 12
    assert set(val.tensors[1].tolist()) == {0, 1}


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="CIFAR-10 not found"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    with pytest.raises(ConfigError, match="CIFAR-100 not found.*cifar-100-python"):
        load_splits(DataConfig(dataset="cifar100", root=str(tmp_path), download=False))


def _write_cifar100(root, monkeypatch, n_train: int = 12, n_test: int = 6) -> None:
    """A tiny CIFAR-100 in the files torchvision downloads: pickled dicts of uint8 rows (1024 red, 1024 green,
    1024 blue values) with fine and coarse labels, plus the label names. torchvision checks each file's md5
    against the real data set's, so the test points those checksums at its own files (nothing else is faked)."""
    from torchvision.datasets import CIFAR100

    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[0, :1024], data[0, 1024:] = 255, 0  # example 0: pure red
        fine = [(7 * i) % 100 for i in range(n - 1)] + [99]
        entry = {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                 "filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"superclass{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


@pytest.mark.parametrize("download", [False, True], ids=["local", "download-when-missing"])
def test_cifar100_reads_torchvisions_files_with_fine_labels(tmp_path, monkeypatch, download):
    _write_cifar100(tmp_path, monkeypatch)
    # download: true finds the files in place and fetches nothing (this machine is offline)
    train, val = load_splits(DataConfig(dataset="cifar100", root=str(tmp_path), download=download))
    assert train.tensors[0].shape == (12, 3, 32, 32) and val.tensors[0].shape == (6, 3, 32, 32)  # train / test
    assert train.tensors[1].max() == val.tensors[1].max() == 99 and train.tensors[1][1] == 7  # fine labels
    red = train.tensors[0][0]
    assert (red[0] > 1.0).all() and (red[1:] < -1.0).all()  # channels in R, G, B order


def test_calibration_batches_are_repeatable_and_sized():
    train, _ = load_splits(DataConfig(dataset="digits", image_size=8, channels=1))
    a = calibration_batches(train, 64, 3, seed=0)
    b = calibration_batches(train, 64, 3, seed=0)
    assert [x.shape[0] for x in a] == [64, 64, 64]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ConfigError):
        calibration_batches(train, 10_000, 1, seed=0)
