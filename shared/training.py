"""Training loops: base models from scratch, stitched variants (Algorithm 2), evaluation.

Stitch-only fine-tuning never changes the front blocks, so their outputs are computed once per dataset and
cached (`cache_front_outputs`); every epoch then runs only stitch + behind blocks.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from shared.config import TrainConfig


def _loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256, forward=None) -> float:
    """Top-1 accuracy in [0, 1]. `forward` overrides model(x), e.g. model.forward_from_front on cached outputs."""
    was_training = model.training
    model.eval()
    forward = forward or model
    correct = 0
    for x, y in _loader(dataset, batch_size, shuffle=False):
        correct += (forward(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / max(len(dataset), 1)


@torch.no_grad()
def cache_front_outputs(model: nn.Module, dataset: TensorDataset, batch_size: int = 64) -> TensorDataset:
    """Run the frozen front blocks once over a dataset: (front output, label) pairs."""
    model.front.eval()
    outs, labels = [], []
    for x, y in _loader(dataset, batch_size, shuffle=False):
        outs.append(model.front(x))
        labels.append(y)
    return TensorDataset(torch.cat(outs), torch.cat(labels))


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding), optionally horizontal flips."""
    if kind == "none":
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, len(x)), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])
    if kind == "shift+flip":
        flip = torch.rand(len(x), generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def fit(forward, params: list[nn.Parameter], dataset: TensorDataset, cfg: TrainConfig, desc: str = "train",
        progress: bool = True, seed: int = 0, train_modules: list[nn.Module] = (), augment: bool = True) -> dict:
    """SGD with momentum and a cosine schedule over `params`, cross-entropy on `forward(x)`.

    `augment=False` for inputs that are not images (cached front outputs)."""
    g_aug = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = _loader(dataset, cfg.batch_size, shuffle=True, seed=seed)
    steps = max(cfg.epochs * len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for m in train_modules:
        m.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    # disable=None: bars only on a terminal; a log file gets the callers' summary lines, not every bar update.
    bar = tqdm(total=steps, desc=desc, disable=None if progress else True, leave=False, unit="step")
    for _ in range(cfg.epochs):
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            if augment:
                x = augment_batch(x, cfg.augment, g_aug)
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    bar.close()
    return {"loss": loss_sum / max(seen, 1), "seconds": time.perf_counter() - start, "examples": len(dataset)}


def train_base(model: nn.Module, train: TensorDataset, cfg: TrainConfig, desc: str = "base model",
               progress: bool = True, seed: int = 0) -> dict:
    """Train a base model from scratch (the paper's CNN-CNN protocol: SGD, momentum, weight decay, cosine)."""
    torch.manual_seed(seed)
    stats = fit(model, [p for p in model.parameters() if p.requires_grad], train, cfg, desc, progress, seed, [model])
    model.eval()
    return stats


def finetune(model: nn.Module, train: TensorDataset, cfg: TrainConfig, strategy: str = "stitch",
             cached: bool = True, desc: str = "fine-tune", progress: bool = True, seed: int = 0) -> dict:
    """Algorithm 2 and the paper's other strategies. Stitch-only training reuses cached front outputs."""
    torch.manual_seed(seed)
    trainable = model.set_strategy(strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    use_cache = strategy == "stitch" and cached and cfg.augment == "none"  # augmented inputs differ every epoch
    if use_cache:
        data, forward = cache_front_outputs(model, train), model.forward_from_front
    else:
        data, forward = train, model
    model.train()
    stats = fit(forward, params, data, cfg, desc, progress, seed, augment=not use_cache)
    model.eval()
    stats["trainable_params"] = trainable
    return stats


def finetune_stitch(model: nn.Module, dataset: TensorDataset, epochs: int, lr: float, batch_size: int = 32,
                    momentum: float = 0.9, weight_decay: float = 0.0, cached: bool = True,
                    progress: bool = False, seed: int = 0) -> dict:
    """Stitch-only fine-tuning with plain arguments (what a federated client calls)."""
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size)
    return finetune(model, dataset, cfg, "stitch", cached, "stitch", progress, seed)


def train_stitch_on_front(model: nn.Module, front_outputs: TensorDataset, epochs: int, lr: float,
                          batch_size: int = 32, momentum: float = 0.9, seed: int = 0) -> dict:
    """Stitch-only training on front outputs computed beforehand (a federated client's cache): the same steps
    as `finetune_stitch`, without the front pass."""
    torch.manual_seed(seed)
    model.set_strategy("stitch")
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=0.0, batch_size=batch_size)
    model.train()
    stats = fit(model.forward_from_front, params, front_outputs, cfg, "stitch", False, seed, augment=False)
    model.eval()
    return stats
