"""Datasets as in-memory tensors, and how to split them across devices.

- ``digits``: the UCI handwritten digits bundled with scikit-learn (1,797 8x8 images): real data, offline.
- ``cifar10``, ``cifar100``: torchvision's CIFAR-10 / CIFAR-100 (fine labels), downloaded when `download: true`
  and online.
- ``imagefolder``: any folder of class sub-folders (torchvision ImageFolder) with ``train/`` and ``val/`` inside,
  or a single folder that is split by ``val_fraction``.
Images are resized to ``image_size``, given ``channels`` channels and normalised per channel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from shared.config import DataConfig
from shared.errors import ConfigError


def load_splits(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) as TensorDatasets of (float32 images N,C,H,W normalised, int64 labels)."""
    if cfg.dataset == "digits":
        x, y = _digits()
        (xtr, ytr), (xva, yva) = _split(x, y, cfg.val_fraction, cfg.seed)
    elif cfg.dataset in ("cifar10", "cifar100"):
        (xtr, ytr), (xva, yva) = _cifar(cfg)
    elif cfg.dataset == "imagefolder":
        (xtr, ytr), (xva, yva) = _imagefolder(cfg)
    else:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}", "use digits, cifar10, cifar100 or imagefolder")
    xtr, xva = _prepare(xtr, cfg), _prepare(xva, cfg)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return TensorDataset((xtr - mean) / std, ytr), TensorDataset((xva - mean) / std, yva)


def calibration_batches(train: TensorDataset, examples: int, repeats: int, seed: int) -> list[torch.Tensor]:
    """`repeats` disjoint-as-possible random batches of `examples` images (the paper repeats M times)."""
    n = len(train)
    if examples > n:
        raise ConfigError(f"calibration needs {examples} examples but the training split has {n}",
                          "lower data.calibration.examples")
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    images = train.tensors[0]
    out = []
    for r in range(repeats):
        start = (r * examples) % max(n - examples + 1, 1)
        out.append(images[perm[start:start + examples]])
    return out


def partition_indices(labels: np.ndarray, num_parts: int, kind: str = "iid", alpha: float = 0.5,
                      seed: int = 0) -> list[np.ndarray]:
    """Split example indices across `num_parts` devices: IID, or non-IID by a Dirichlet(alpha) per class.

    Small alpha -> each device sees few classes. Every part gets at least one example.
    """
    labels = np.asarray(labels)
    if num_parts < 1 or num_parts > len(labels):
        raise ConfigError(f"cannot split {len(labels)} examples into {num_parts} parts")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_parts)]
    if kind != "dirichlet":
        raise ConfigError(f"unknown partition kind {kind!r}", "use iid or dirichlet")
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    for p in range(num_parts):  # no empty device: borrow one example from the largest part
        if not parts[p]:
            donor = max(range(num_parts), key=lambda k: len(parts[k]))
            parts[p].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def _split(x, y, val_fraction: float, seed: int):
    """Stratified split so both sides see every class."""
    g = np.random.default_rng(seed)
    val_idx = []
    for cls in torch.unique(y).tolist():
        idx = g.permutation(np.flatnonzero(y.numpy() == cls))
        val_idx.extend(idx[: max(1, int(round(len(idx) * val_fraction)))].tolist())
    mask = np.ones(len(y), dtype=bool)
    mask[val_idx] = False
    tr = torch.from_numpy(np.flatnonzero(mask))
    va = torch.from_numpy(np.sort(np.asarray(val_idx)))
    return (x[tr], y[tr]), (x[va], y[va])


def _prepare(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    if x.shape[1] != cfg.channels:
        if x.shape[1] == 1:
            x = x.expand(-1, cfg.channels, -1, -1)
        elif cfg.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ConfigError(f"images have {x.shape[1]} channels, the config asks for {cfg.channels}")
    if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    return x.contiguous()


def _to_tensors(ds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a torchvision dataset of PIL images (of any sizes) into tensors of size x size."""
    from torchvision.transforms.functional import pil_to_tensor

    xs, ys = [], []
    for img, label in ds:
        x = pil_to_tensor(img.convert("RGB")).float().unsqueeze(0) / 255.0
        xs.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
        ys.append(label)
    if not xs:
        raise ConfigError("the dataset folder holds no images")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _cifar(cfg: DataConfig):
    """CIFAR-10 or CIFAR-100 through torchvision: its train split for training, its test split for validation."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, title = {"cifar10": (CIFAR10, "CIFAR-10"), "cifar100": (CIFAR100, "CIFAR-100")}[cfg.dataset]
    root = Path(cfg.root or f"data/{cfg.dataset}")
    try:
        train = cls(str(root), train=True, download=cfg.download)
        val = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as exc:
        raise ConfigError(f"{title} not found under {root}: {exc}",
                          f"set data.download: true when online, or data.root to a folder holding {cls.base_folder}")
    except OSError as exc:
        raise ConfigError(f"could not download {title}: {exc}", "this machine may be offline; use data.root") from exc
    x = lambda ds: torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    return (x(train), torch.tensor(train.targets)), (x(val), torch.tensor(val.targets))


def _imagefolder(cfg: DataConfig):
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} not found")
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
            if train.classes != val.classes:
                raise ConfigError(f"{root}/train and {root}/val have different classes")
            return _to_tensors(train, cfg.image_size), _to_tensors(val, cfg.image_size)
        x, y = _to_tensors(ImageFolder(str(root)), cfg.image_size)
    except FileNotFoundError as exc:
        raise ConfigError(f"{root}: {exc}", "expected one sub-folder of images per class") from exc
    return _split(x, y, cfg.val_fraction, cfg.seed)
