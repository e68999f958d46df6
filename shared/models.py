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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"checkpoint {path} does not fit the model: {str(exc).splitlines()[-1].strip()[:200]}",
                         "check the model name and kwargs (num_classes, in_chans, width) in the config") from None
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
                         "check the model name and kwargs (num_classes, in_chans, width) in the config")


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def check_input(model: nn.Module, input_shape: tuple[int, int, int], name: str) -> None:
    """Fail early, in one line, when the data's image size or channels do not suit the model."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(f"model {name} cannot take input of shape {tuple(input_shape)}: {str(exc).splitlines()[0][:160]}",
                         "set data.image_size / data.channels (or the model's img_size / in_chans kwargs) to match") from None
    finally:
        model.train(was_training)
