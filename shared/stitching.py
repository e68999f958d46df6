"""Stitching layers between two models' blocks, and the stitched model (front -> stitch -> behind).

Every boundary kind goes through one path: the source activation becomes a grid (N, C, H, W) plus its prefix
(class/distillation) tokens, the grid is resized to the destination grid by a fixed parameter-free op, a
pointwise channel map projects C_in -> C_out, and the result is laid out as the destination expects. The paper's
layers are special cases: CNN->CNN 1x1 conv, Transformer->Transformer linear, CNN->Transformer 2D conv then
flatten to tokens, Transformer->CNN reshape then a pointwise map. Because resize and projection are both linear,
the layer can be initialised by least squares on calibration activations (as SN-Net does) before training.

CNN->CNN may use a k x k convolution instead of the pointwise map (`kernel_size`, odd, "same" padding). It has
no bias, as the paper's 3x3 stitches (their trainable counts are exactly 9 x C_in x C_out), and its least-squares
fit runs on the k x k patches of the resized source grid.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import IntegrityError
from shared.specs import ActivationSpec
from shared.vocabulary import STRATEGIES, TRAINABLE_PARTS

MAX_LS_ROWS = 200_000  # rows of the least-squares problem; more are subsampled (deterministically)


class StitchingLayer(nn.Module):
    """Maps the front model's activation at the cut (`src`) to the input the behind model expects (`dst`)."""

    def __init__(self, src: ActivationSpec, dst: ActivationSpec, kernel_size: int = 1):
        super().__init__()
        if "logits" in (src.layout, dst.layout):
            raise ValueError(f"cannot stitch at a classifier output ({src.layout} -> {dst.layout})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"stitch kernel size must be odd and >= 1 (same padding), got {kernel_size}")
        if kernel_size > 1 and not src.layout == dst.layout == "nchw":
            raise ValueError(f"a {kernel_size}x{kernel_size} stitch needs CNN feature maps on both sides, "
                             f"got {src.layout} -> {dst.layout}")
        self.src, self.dst, self.kernel_size = src, dst, kernel_size
        cin, cout = src.channels, dst.channels
        if src.layout == "nchw":
            self.proj = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=kernel_size == 1)
        else:
            self.proj = nn.Linear(cin, cout)
        p = dst.prefix_tokens if dst.layout == "tokens" else 0
        # Same number of prefix tokens on both sides: they go through the same channel map as the grid.
        self.shares_prefix = p > 0 and src.prefix_tokens == p
        # Otherwise the destination's prefix tokens are predicted from the mean of the source grid.
        self.prefix = nn.Linear(cin, p * cout) if p > 0 and not self.shares_prefix else None
        # A CNN carries no position embedding; the behind transformer may rely on one.
        h, w = dst.grid
        self.pos_bias = nn.Parameter(torch.zeros(1, h * w, cout)) if self.kind == "cnn->tokens" else None

    @property
    def kind(self) -> str:
        return f"{self.src.family_kind}->{self.dst.family_kind}"

    def extra_repr(self) -> str:
        kernel = f" ({self.kernel_size}x{self.kernel_size})" if self.kernel_size > 1 else ""
        return f"{self.kind}{kernel}: {self.src} -> {self.dst}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, prefix = _to_grid(x, self.src)
        mean = grid.mean(dim=(2, 3)) if self.prefix is not None else None
        y = self._project(_resize(grid, self.dst.grid))
        if self.dst.layout == "nchw":
            return y
        tokens = y.flatten(2).transpose(1, 2)  # (N, H*W, C_out)
        if self.pos_bias is not None:
            tokens = tokens + self.pos_bias
        if self.dst.layout == "nhwc":
            return tokens.reshape(y.shape[0], *self.dst.grid, y.shape[1]).contiguous()
        if self.shares_prefix:
            tokens = torch.cat([self.proj(prefix), tokens], dim=1)
        elif self.prefix is not None:
            tokens = torch.cat([self.prefix(mean).view(y.shape[0], -1, y.shape[1]), tokens], dim=1)
        return tokens.contiguous()

    def _project(self, grid: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Conv2d):
            return self.proj(grid)
        return self.proj(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def init_least_squares(self, src_acts: torch.Tensor, dst_acts: torch.Tensor, ridge: float = 1e-4) -> float:
        """Fit every weight by ridge-regularised least squares (float64); return ||pred - Y|| / ||Y||.

        `src_acts` is the front model's output at the cut, `dst_acts` the behind model's input at its first used
        block, for the same examples. `ridge` scales the mean diagonal of the centred Gram matrix (scale-free).
        """
        grid, prefix = _to_grid(src_acts.detach().to("cpu", torch.float64), self.src)
        y_grid, y_prefix = _to_grid(dst_acts.detach().to("cpu", torch.float64), self.dst)
        cin, cout = self.src.channels, self.dst.channels
        y_rows = y_grid.permute(0, 2, 3, 1).reshape(-1, cout)
        if self.kernel_size > 1:
            weight = _ridge_fit_patches(_resize(grid, self.dst.grid), y_rows, self.kernel_size, ridge)
            self.proj.weight.copy_(weight.view_as(self.proj.weight))
            return self._residual(src_acts, dst_acts)
        # Enlarging the grid repeats each source value over many rows: then fit at the source resolution.
        enlarged = (self.pos_bias is None and not self.shares_prefix and len(y_rows) <= MAX_LS_ROWS
                    and grid.shape[2] * grid.shape[3] < y_grid.shape[2] * y_grid.shape[3])
        x_rows = None if enlarged else _resize(grid, self.dst.grid).permute(0, 2, 3, 1).reshape(-1, cin)
        if self.shares_prefix:
            x_fit = torch.cat([x_rows, prefix.reshape(-1, cin)])
            y_fit = torch.cat([y_rows, y_prefix.reshape(-1, cout)])
        else:
            x_fit, y_fit = x_rows, y_rows
        if enlarged:
            weight, bias = _ridge_fit_resized(grid, y_rows, self.dst.grid, ridge)
        elif self.pos_bias is None:
            weight, bias = _ridge_fit(x_fit, y_fit, ridge)
        else:
            # Joint fit of the channel map and a bias per position: centre every position over the examples,
            # fit the map on that, then the position bias is the mean residual per position.
            x_pos, y_pos = x_rows.view(grid.shape[0], -1, cin), y_rows.view(grid.shape[0], -1, cout)
            x_pos_mean, y_pos_mean = x_pos.mean(dim=0), y_pos.mean(dim=0)
            weight, _ = _ridge_fit((x_pos - x_pos_mean).reshape(-1, cin), (y_pos - y_pos_mean).reshape(-1, cout),
                                   ridge)
            per_position = y_pos_mean - x_pos_mean @ weight.T
            bias = per_position.mean(dim=0)
            self.pos_bias.copy_((per_position - bias).unsqueeze(0))
        self.proj.weight.copy_(weight.view_as(self.proj.weight))
        self.proj.bias.copy_(bias)
        if self.prefix is not None:
            weight, bias = _ridge_fit(grid.mean(dim=(2, 3)), y_prefix.reshape(y_prefix.shape[0], -1), ridge)
            self.prefix.weight.copy_(weight)
            self.prefix.bias.copy_(bias)
        return self._residual(src_acts, dst_acts)

    def _residual(self, src_acts: torch.Tensor, dst_acts: torch.Tensor) -> float:
        """||self(src) - dst|| / ||dst||, in float64."""
        param = self.proj.weight
        pred = self(src_acts.to(param.device, param.dtype)).double()
        target = dst_acts.to(param.device, torch.float64)
        return float(torch.linalg.vector_norm(pred - target) / torch.linalg.vector_norm(target).clamp_min(1e-12))

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """PyTorch's default Linear/Conv init (uniform, bound 1/sqrt(fan_in)) from `seed`, on any device."""
        gen = torch.Generator().manual_seed(seed)
        for layer in (self.proj, self.prefix):
            if layer is not None:
                bound = 1.0 / math.sqrt(layer.weight[0].numel())  # fan_in: C_in (x k x k for a conv)
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        if self.pos_bias is not None:
            self.pos_bias.zero_()


def stitching_layer(src: ActivationSpec, dst: ActivationSpec, cnn_kernel_size: int = 1) -> StitchingLayer:
    """The stitch for a boundary: `cnn_kernel_size` applies to CNN->CNN; the other kinds keep their pointwise map."""
    return StitchingLayer(src, dst, cnn_kernel_size if src.layout == dst.layout == "nchw" else 1)


def _to_grid(x: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An activation of layout `spec.layout` as a (N, C, H, W) grid plus its (N, P, C) prefix tokens (or None)."""
    if spec.layout == "nchw":
        return x, None
    if spec.layout == "nhwc":
        return x.permute(0, 3, 1, 2), None
    p, (h, w) = spec.prefix_tokens, spec.grid
    if x.dim() != 3 or x.shape[1] != p + h * w:
        raise ValueError(f"expected tokens of shape (N, {p + h * w}, C) for {p} prefix tokens and a {h}x{w} grid, "
                         f"got {tuple(x.shape)}")
    grid = x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return grid, (x[:, :p] if p else None)


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool when shrinking, bilinear when enlarging: fixed linear ops, no parameters."""
    size = tuple(size)
    if tuple(grid.shape[-2:]) == size:
        return grid
    if grid.shape[-2] >= size[0] and grid.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(grid, size)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C_out, C_in), bias) minimising ||x W^T + b - y||^2 + lam ||W||^2; the bias is not penalised."""
    if x.shape[0] > MAX_LS_ROWS:
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_LS_ROWS]
        x, y = x[rows], y[rows]
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    return _ridge_solve(xc.T @ xc, xc.T @ yc, x_mean, y_mean, ridge)


def _ridge_fit_resized(grid: torch.Tensor, y: torch.Tensor, size: tuple[int, int],
                       ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ridge_fit` of the rows of `_resize(grid, size)` against `y`, without building the resized rows.

    The resize is a fixed map P (D x S) of each channel's S source positions onto D destination positions, with
    rows summing to 1, so the centred normal equations sum_n G_n P^T P G_n^T and sum_n G_n P^T Y_n are formed at
    the source resolution (G_n: example n's centred (C, S) grid). Same fit, D / S times less work.
    """
    n, cin, h, w = grid.shape
    s = h * w
    p = _resize(torch.eye(s, dtype=grid.dtype).view(s, 1, h, w), size).reshape(s, -1).T  # (D, S)
    d = p.shape[0]
    g = grid.reshape(n, cin, s)
    x_mean = (g @ p.sum(dim=0)).sum(dim=0) / (n * d)
    y_mean = y.mean(dim=0)
    gc = g - x_mean[:, None]
    flat = gc.transpose(0, 1).reshape(cin, n * s)
    gram = flat @ (gc @ (p.T @ p)).transpose(0, 1).reshape(cin, n * s).T
    cross = flat @ (p.T @ (y - y_mean).view(n, d, -1)).reshape(n * s, -1)
    return _ridge_solve(gram, cross, x_mean, y_mean, ridge)


def _ridge_fit_patches(grid: torch.Tensor, y: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """Weight (C_out, C_in * k * k) minimising ||P W^T - y||^2 + lam ||W||^2, P = the k x k patches of `grid`.

    P's rows are `F.unfold` of the grid with the conv's "same" padding, in the conv weight's (C_in, k, k) order;
    no bias, so no centring. The normal equations are accumulated a few examples at a time (P has k * k times
    the entries of the grid), over the same deterministic subsample of rows as `_ridge_fit`.
    """
    n, cin, h, w = grid.shape
    rows = n * h * w
    keep = torch.ones(rows, dtype=torch.bool)
    if rows > MAX_LS_ROWS:
        keep.zero_()
        keep[torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:MAX_LS_ROWS]] = True
    d = cin * k * k
    gram, cross = grid.new_zeros(d, d), grid.new_zeros(d, y.shape[1])
    step = max(1, 2**22 // (h * w * d))  # examples per chunk: ~32 MB of patches in float64
    for i in range(0, n, step):
        lo, hi = i * h * w, min(n, i + step) * h * w
        patches = F.unfold(grid[i:i + step], k, padding=k // 2).transpose(1, 2).reshape(-1, d)[keep[lo:hi]]
        gram += patches.T @ patches
        cross += patches.T @ y[lo:hi][keep[lo:hi]]
    weight, _ = _ridge_solve(gram, cross, grid.new_zeros(d), y.new_zeros(y.shape[1]), ridge)  # through the origin
    return weight


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, x_mean: torch.Tensor, y_mean: torch.Tensor,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    lam = ridge * gram.diagonal().mean() + 1e-12  # the floor keeps a constant input solvable
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), cross).T
    return weight, y_mean - weight @ x_mean


class StitchedModel(nn.Module):
    """front blocks -> stitching layer -> behind blocks, with the paper's four fine-tuning strategies."""

    def __init__(self, front_blocks: Iterable[nn.Module], stitch: StitchingLayer, behind_blocks: Iterable[nn.Module]):
        super().__init__()
        self.front = nn.Sequential(*front_blocks)
        self.stitch = stitch
        self.behind = nn.Sequential(*behind_blocks)
        self.set_strategy("stitch")  # the paper's default: only the stitching layer learns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_front(self.front(x))

    def forward_from_front(self, h: torch.Tensor) -> torch.Tensor:
        """The rest of the model from the front's output (lets training cache the frozen front's outputs)."""
        return self.behind(self.stitch(h))

    def set_strategy(self, strategy: str) -> int:
        """Freeze everything outside `strategy`; return the number of trainable parameters."""
        if strategy not in TRAINABLE_PARTS:
            raise ValueError(f"unknown fine-tuning strategy {strategy!r}; expected one of {STRATEGIES}")
        self.strategy = strategy
        for name in ("front", "stitch", "behind"):
            getattr(self, name).requires_grad_(name in TRAINABLE_PARTS[strategy])
        self.train(self.training)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> StitchedModel:
        """Frozen parts stay in eval mode: their BatchNorm statistics and dropout must not change."""
        super().train(mode)
        for name in ("front", "behind"):
            if name not in TRAINABLE_PARTS[self.strategy]:
                getattr(self, name).eval()
        return self

    def stitch_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.stitch.state_dict().items()}

    def load_stitch_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load stitching weights after checking keys, shapes, dtypes and finiteness (IntegrityError otherwise)."""
        hint = "the weights were made for another variant or are corrupt; fetch the variant's current stitch"
        expected = self.stitch.state_dict()
        if not isinstance(state, Mapping):
            raise IntegrityError(f"stitching weights must be a mapping of tensors, got {type(state).__name__}", hint)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise IntegrityError(f"stitching weights do not fit the layer: missing {missing}, unexpected {unexpected}",
                                 hint)
        for key, ref in expected.items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise IntegrityError(f"stitching weight {key} is a {type(value).__name__}, not a tensor", hint)
            if value.shape != ref.shape:
                raise IntegrityError(f"stitching weight {key} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(ref.shape)}", hint)
            if value.dtype != ref.dtype:
                raise IntegrityError(f"stitching weight {key} has dtype {value.dtype}, expected {ref.dtype}", hint)
            if not torch.isfinite(value).all():
                raise IntegrityError(f"stitching weight {key} has non-finite values (NaN or inf)", hint)
        self.stitch.load_state_dict(state, strict=True)

