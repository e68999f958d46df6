"""Creating the two base models: timm names (hub weights when online), local safetensors checkpoints."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch.nn as nn
from safetensors.torch import load_file, save_file

import shared.cifar_models  # noqa: F401  registers cifar_vgg* in timm's registry
from shared.errors import ModelError


def create_model(name: str, kwargs: dict | None = None, pretrained: bool = False,
                 checkpoint: str | Path | None = None) -> nn.Module:
    """A timm model by name; weights from `checkpoint` (safetensors) or the hub when `pretrained`."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelError(f"unknown model {name!r}",
                         f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for names")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"checkpoint {checkpoint} not found",
                         "give the path of a .safetensors file, or remove `checkpoint` to train/download")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **(kwargs or {}))
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise ModelError(f"could not download pretrained weights for {name}: {str(exc).splitlines()[0][:200]}",
                             "this machine may be offline: set `checkpoint:` to a local .safetensors file, "
                             "or `pretrained: false` with `train:` to train from scratch") from exc
        raise ModelError(f"could not create {name}: {exc}") from exc
    except TypeError as exc:
        raise ModelError(f"could not create {name} with kwargs {kwargs}: {exc}") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict; a mismatch names the first offending keys."""
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
                         "check the model name and kwargs (num_classes, in_chans, width) in the config")


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
