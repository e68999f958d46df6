"""Costs of any nn.Module (a base model, a block, a stitched variant): parameters, FLOPs, memory, latency.

Parameters are exact; FLOPs come from torch's FlopCounterMode; memory and latency are measured by
running the module, not estimated from shapes.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """All parameters; a parameter shared by several submodules is counted once."""
    return sum(p.numel() for p in module.parameters())


def state_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (each tensor once)."""
    return sum(t.numel() * t.element_size() for t in chain(module.parameters(), module.buffers()))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no BN statistics updates, no dropout), then every submodule's own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


FLOPS_PER_MAC = 2  # FlopCounterMode counts a multiply-add (of a conv, matmul, attention) as 2 FLOPs


def count_flops(fn_or_module: Callable[[torch.Tensor], object], example_input: torch.Tensor) -> int:
    """FLOPs of one no-grad call (a multiply-add counts 2); pass a batch of 1 for per-example FLOPs."""
    counter = FlopCounterMode(display=False)
    if isinstance(fn_or_module, nn.Module):
        with _eval_mode(fn_or_module), torch.no_grad(), counter:
            fn_or_module(example_input)
    else:
        with torch.no_grad(), counter:
            fn_or_module(example_input)
    return int(counter.get_total_flops())


def count_macs(fn_or_module: Callable[[torch.Tensor], object], example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one no-grad call: the unit of the paper's FLOPs column (VGG11 at 32 px: 153.9M).

    Exactly the conv/matmul work, `count_flops / 2`. The paper's profiler (thop) also counts a few operations
    per BatchNorm and pooling output, hence its 0.3-0.4% larger figures (docs/CATALOG.md).
    """
    return count_flops(fn_or_module, example_input) // FLOPS_PER_MAC


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the tensor storages that ATen ops create while active, and their peak.

    Each output storage that is not one of the op's inputs (so not a view or an in-place result) is
    recorded once with its nbytes; a weakref finalizer subtracts it when the storage is freed. This
    is what the tensors themselves occupy; scratch space inside a kernel (e.g. oneDNN workspaces)
    and allocator overhead are not visible at this level.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def inference_peak_bytes(module: nn.Module, example_input: torch.Tensor) -> int:
    """Measured peak memory of one no-grad forward in eval mode.

    = parameter and buffer bytes + the input + the peak of live tensor bytes created during the
    forward (tracked per storage by a TorchDispatchMode, see `_StorageTracker`).
    """
    with _eval_mode(module), torch.no_grad(), _StorageTracker() as tracker:
        module(example_input)
    return state_bytes(module) + _bytes(example_input) + tracker.peak


def training_peak_bytes(
    forward: Callable[[torch.Tensor], torch.Tensor], params_module: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> int:
    """Measured peak memory of one training step: forward, cross-entropy, backward, SGD-with-momentum step.

    `forward` maps x to logits using only the state of `params_module` (e.g. a stitched model's
    `forward_from_front` on cached front outputs); only its parameters with requires_grad are trained.
    Result = parameter and buffer bytes + x and y + the peak of live tensor bytes created during the
    step: saved activations, gradients, momentum buffers and temporaries (see `_StorageTracker`).
    Modules run in their current train/eval mode. The step is undone: trainable parameters, buffers
    (e.g. BN statistics) and gradients are restored afterwards.
    """
    trainable = [p for p in params_module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("params_module has no parameter with requires_grad: nothing to train")
    state = trainable + list(params_module.buffers())
    saved = [t.detach().clone() for t in state]
    saved_grads = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    try:
        with _StorageTracker() as tracker:
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
    finally:
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
        for p, g in zip(trainable, saved_grads):
            p.grad = g
    return state_bytes(params_module) + _bytes(x) + _bytes(y) + tracker.peak


def latency_ms(module: nn.Module, example_input: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time in milliseconds of a no-grad forward in eval mode, after `warmup` untimed runs."""
    times = []
    with _eval_mode(module), torch.no_grad():
        for _ in range(warmup):
            module(example_input)
        for _ in range(repeats):
            start = time.perf_counter()
            module(example_input)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
