"""Stitching layers of every boundary kind, least-squares init, fine-tuning strategies, stitch weight loading."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from shared.blocks import activation_specs, block_outputs, split_model
from shared.errors import IntegrityError
from shared.specs import ActivationSpec
from shared.stitching import MAX_LS_ROWS, StitchedModel, StitchingLayer, stitching_layer
from shared.vocabulary import STRATEGIES

# (timm name, kwargs, input size): small, fast stand-ins for the paper's models.
MODELS = {
    "resnet18": ("resnet18", {}, 32),
    "vgg11": ("cifar_vgg11", {"width": 0.25}, 32),
    "deit_small": ("deit_small_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 4}, 32),
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 4}, 32),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64),
}
_cache = {}


def blocked(key: str):
    """(BlockedModel, specs, input size); models are built once per test session."""
    if key not in _cache:
        name, kwargs, size = MODELS[key]
        torch.manual_seed(0)
        bm = split_model(timm.create_model(name, num_classes=10, **kwargs).eval(), name)
        _cache[key] = (bm, activation_specs(bm, (3, size, size)), size)
    return _cache[key]


def stitched(front_key: str, front_cut: int, behind_key: str, behind_cut: int, kernel_size: int = 1) -> StitchedModel:
    """A stitched model on private copies of the cached models (strategies and training change them)."""
    front, front_specs, _ = blocked(front_key)
    behind, behind_specs, _ = blocked(behind_key)
    front, behind = copy.deepcopy(front), copy.deepcopy(behind)
    stitch = StitchingLayer(front_specs[front_cut - 1], behind_specs[behind_cut - 1], kernel_size)
    return StitchedModel(list(front.blocks[:front_cut]), stitch, list(behind.blocks[behind_cut:]))


def layout_shape(spec: ActivationSpec, n: int) -> tuple:
    c, (h, w), p = spec.channels, spec.grid, spec.prefix_tokens
    return {"nchw": (n, c, h, w), "nhwc": (n, h, w, c), "tokens": (n, p + h * w, c)}[spec.layout]


def relative_residual(stitch: StitchingLayer, src: torch.Tensor, dst: torch.Tensor) -> float:
    with torch.no_grad():
        return float((stitch(src) - dst).norm() / dst.norm())


# front cut and behind cut chosen so that every kind also crosses a channel and/or grid mismatch.
BOUNDARIES = [
    ("cnn->cnn", "resnet18", 3, "vgg11", 1),  # layer1.1 (64ch 8x8) -> after features.0 (16ch 16x16)
    ("tokens->tokens", "deit_small", 2, "deit_tiny", 3),  # 384 -> 192 channels, class token kept
    ("tokens->tokens", "swin_tiny", 1, "deit_tiny", 2),  # nhwc 96ch 16x16 -> tokens 192ch 8x8 + class token
    ("cnn->tokens", "resnet18", 5, "deit_tiny", 2),  # layer2.1 (128ch 4x4) -> tokens 8x8 + class token
    ("cnn->tokens", "resnet18", 3, "swin_tiny", 4),  # layer1.1 (64ch 8x8) -> swin nhwc 192ch 8x8
    ("tokens->cnn", "deit_tiny", 3, "resnet18", 5),  # tokens 8x8 -> layer2.1 input (128ch 4x4)
]


@pytest.mark.parametrize("kind, front_key, front_cut, behind_key, behind_cut", BOUNDARIES,
                         ids=[f"{b[1]}-{b[3]}" for b in BOUNDARIES])
def test_each_boundary_kind_trains_only_the_stitching_layer(kind, front_key, front_cut, behind_key, behind_cut):
    model = stitched(front_key, front_cut, behind_key, behind_cut)
    assert model.stitch.kind == kind
    size = blocked(front_key)[2]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.stitch(model.front(x)).shape == layout_shape(model.stitch.dst, 2)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    stitch_params = {id(p) for p in model.stitch.parameters()}
    for p in model.parameters():
        if id(p) in stitch_params:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.forward_from_front(model.front(x)), model(x))


def test_stitching_layer_parts_follow_the_boundary():
    cnn = ActivationSpec("nchw", 8, (4, 4))
    tok1 = ActivationSpec("tokens", 6, (4, 4), 1)
    tok2 = ActivationSpec("tokens", 6, (4, 4), 2)
    nhwc = ActivationSpec("nhwc", 6, (4, 4))
    layer = StitchingLayer(cnn, tok1)
    assert isinstance(layer.proj, torch.nn.Conv2d) and layer.pos_bias.shape == (1, 16, 6)
    assert layer.prefix.out_features == 6
    layer = StitchingLayer(tok1, tok1)
    assert isinstance(layer.proj, torch.nn.Linear) and layer.prefix is None and layer.pos_bias is None
    assert StitchingLayer(tok1, tok2).prefix.out_features == 12
    assert StitchingLayer(nhwc, cnn).kind == "tokens->cnn"
    out = StitchingLayer(tok2, nhwc)(torch.randn(3, 18, 6))  # prefix tokens dropped, channels-last grid
    assert out.shape == (3, 4, 4, 6)
    with pytest.raises(ValueError):
        StitchingLayer(ActivationSpec("logits", 10), cnn)
    with pytest.raises(ValueError, match="tokens"):
        StitchingLayer(tok1, cnn)(torch.randn(2, 16, 6))  # missing the class token


def _known_linear_pair(src_spec: ActivationSpec, dst_spec: ActivationSpec, n: int = 32):
    """Random source activations and destination = an exactly linear map of them, per stitching design."""
    g = torch.Generator().manual_seed(0)
    cin, cout, (h, w) = src_spec.channels, dst_spec.channels, dst_spec.grid
    weight, bias = torch.randn(cout, cin, generator=g), torch.randn(cout, generator=g)
    if src_spec.layout == "nchw":
        src = torch.randn(n, cin, *src_spec.grid, generator=g)
        grid = src
    else:
        src = torch.randn(n, src_spec.prefix_tokens + h * w, cin, generator=g)
        grid = src[:, src_spec.prefix_tokens:].transpose(1, 2).reshape(n, cin, h, w)
    grid = F.adaptive_avg_pool2d(grid, dst_spec.grid)
    tokens = (grid.flatten(2).transpose(1, 2) @ weight.T) + bias
    pos = torch.randn(1, h * w, cout, generator=g)
    if dst_spec.layout == "nchw":
        return src, tokens.transpose(1, 2).reshape(n, cout, h, w), weight
    if src_spec.layout == "nchw":
        tokens = tokens + pos
    if dst_spec.prefix_tokens == src_spec.prefix_tokens > 0:
        prefix = src[:, : src_spec.prefix_tokens] @ weight.T + bias
    else:
        mix = torch.randn(dst_spec.prefix_tokens * cout, cin, generator=g)
        prefix = (src.mean(dim=(2, 3)) @ mix.T).view(n, -1, cout)
    return src, torch.cat([prefix, tokens], dim=1), weight


@pytest.mark.parametrize("src_spec, dst_spec", [
    (ActivationSpec("nchw", 8, (6, 6)), ActivationSpec("nchw", 5, (3, 3))),  # with average-pool resize
    (ActivationSpec("tokens", 8, (4, 4), 1), ActivationSpec("tokens", 5, (4, 4), 1)),  # shared class token
    (ActivationSpec("nchw", 8, (4, 4)), ActivationSpec("tokens", 5, (4, 4), 1)),  # position bias + prefix head
    (ActivationSpec("tokens", 8, (4, 4), 0), ActivationSpec("nchw", 5, (4, 4))),
], ids=["cnn-cnn", "tokens-tokens", "cnn-tokens", "tokens-cnn"])
def test_least_squares_recovers_an_exactly_linear_relation(src_spec, dst_spec):
    src, dst, weight = _known_linear_pair(src_spec, dst_spec)
    layer = StitchingLayer(src_spec, dst_spec)
    assert layer.init_least_squares(src, dst, ridge=0.0) < 1e-5
    assert relative_residual(layer, src, dst) < 1e-5
    assert torch.allclose(layer.proj.weight.reshape(weight.shape), weight, atol=1e-4)
    assert layer.init_least_squares(src, dst) < 1e-3  # the default ridge barely biases a well-posed fit


def test_least_squares_subsamples_huge_inputs_deterministically():
    src_spec, dst_spec = ActivationSpec("nchw", 4, (72, 72)), ActivationSpec("nchw", 3, (72, 72))
    src, dst, weight = _known_linear_pair(src_spec, dst_spec, n=40)  # 207,360 rows
    a, b = StitchingLayer(src_spec, dst_spec), StitchingLayer(src_spec, dst_spec)
    assert a.init_least_squares(src, dst) < 1e-3
    b.init_least_squares(src, dst)
    assert torch.equal(a.proj.weight, b.proj.weight)
    assert torch.allclose(a.proj.weight.reshape(weight.shape), weight, atol=1e-3)


@pytest.mark.parametrize("front_key, front_cut, behind_key, behind_cut, kernel_size", [
    ("resnet18", 3, "vgg11", 2, 1), ("deit_small", 2, "deit_tiny", 2, 1), ("resnet18", 3, "deit_tiny", 2, 1),
    ("resnet18", 3, "vgg11", 2, 3),
], ids=["resnet-vgg", "deit-deit", "resnet-deit", "resnet-vgg-3x3"])
def test_least_squares_beats_random_init_on_held_out_real_activations(front_key, front_cut, behind_key,
                                                                       behind_cut, kernel_size):
    front, _, size = blocked(front_key)
    behind, _, behind_size = blocked(behind_key)
    assert size == behind_size
    g = torch.Generator().manual_seed(3)
    calib, held_out = torch.rand(24, 3, size, size, generator=g), torch.rand(8, 3, size, size, generator=g)
    with torch.no_grad():
        src, src_test = (block_outputs(front, x)[front_cut - 1] for x in (calib, held_out))
        dst, dst_test = (block_outputs(behind, x)[behind_cut - 1] for x in (calib, held_out))
    model = stitched(front_key, front_cut, behind_key, behind_cut, kernel_size)
    model.stitch.init_random(seed=0)
    random_residual = relative_residual(model.stitch, src_test, dst_test)
    fit_residual = model.stitch.init_least_squares(src, dst)
    assert fit_residual < 1.0
    assert relative_residual(model.stitch, src_test, dst_test) < 0.9 * random_residual


def test_kxk_stitch_is_a_bias_free_same_padded_conv_for_cnn_boundaries_only():
    cnn_a, cnn_b = ActivationSpec("nchw", 8, (8, 8)), ActivationSpec("nchw", 6, (4, 4))
    layer = StitchingLayer(cnn_a, cnn_b, kernel_size=3)
    assert layer.proj.kernel_size == (3, 3) and layer.proj.bias is None  # the paper's 9 x C_in x C_out
    assert sum(p.numel() for p in layer.parameters()) == 9 * 8 * 6
    assert layer(torch.randn(2, 8, 8, 8)).shape == (2, 6, 4, 4)
    assert StitchingLayer(cnn_a, cnn_b).proj.bias is not None  # 1x1 keeps its bias, as before
    layer.init_random(0)
    assert layer.proj.weight.abs().max() <= 1 / (8 * 9) ** 0.5  # PyTorch's bound: 1/sqrt(fan_in), fan_in 8 x 3 x 3
    tokens = ActivationSpec("tokens", 6, (4, 4), 1)
    for bad in ((cnn_a, tokens, 3), (tokens, cnn_b, 3), (cnn_a, cnn_b, 2), (cnn_a, cnn_b, 0)):
        with pytest.raises(ValueError, match="kernel size|CNN feature maps"):
            StitchingLayer(*bad)
    # The pipeline's choice: the configured kernel for CNN->CNN, the pointwise map at other boundaries.
    assert stitching_layer(cnn_a, cnn_b, 5).kernel_size == 5
    assert stitching_layer(cnn_a, tokens, 5).kernel_size == 1


def _known_conv_pair(cin: int, cout: int, src_grid: tuple, dst_grid: tuple, k: int, n: int = 16):
    """Random source maps and destination = a known k x k conv (no bias) of the resized source."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(cout, cin, k, k, generator=g)
    src = torch.randn(n, cin, *src_grid, generator=g)
    if src_grid[0] >= dst_grid[0]:
        resized = F.adaptive_avg_pool2d(src, dst_grid)
    else:
        resized = F.interpolate(src, size=dst_grid, mode="bilinear", align_corners=False)
    return src, F.conv2d(resized, weight, padding=k // 2), weight


@pytest.mark.parametrize("src_grid, dst_grid, k", [
    ((8, 8), (8, 8), 3), ((8, 8), (4, 4), 3), ((4, 4), (8, 8), 3), ((6, 6), (6, 6), 5),
], ids=["same-3x3", "shrink-3x3", "enlarge-3x3", "same-5x5"])
def test_kxk_least_squares_recovers_a_known_convolution(src_grid, dst_grid, k):
    src, dst, weight = _known_conv_pair(8, 5, src_grid, dst_grid, k)
    layer = StitchingLayer(ActivationSpec("nchw", 8, src_grid), ActivationSpec("nchw", 5, dst_grid), k)
    assert layer.init_least_squares(src, dst, ridge=0.0) < 1e-5
    assert relative_residual(layer, src, dst) < 1e-5
    assert torch.allclose(layer.proj.weight, weight, atol=1e-4)
    assert layer.init_least_squares(src, dst) < 1e-3  # the default ridge barely biases a well-posed fit


def test_kxk_least_squares_subsamples_huge_inputs_deterministically():
    src, dst, weight = _known_conv_pair(3, 2, (72, 72), (72, 72), 3, n=40)  # 207,360 rows
    assert 40 * 72 * 72 > MAX_LS_ROWS
    spec_in, spec_out = ActivationSpec("nchw", 3, (72, 72)), ActivationSpec("nchw", 2, (72, 72))
    a, b = StitchingLayer(spec_in, spec_out, 3), StitchingLayer(spec_in, spec_out, 3)
    assert a.init_least_squares(src, dst) < 1e-3
    b.init_least_squares(src, dst)
    assert torch.equal(a.proj.weight, b.proj.weight)
    assert torch.allclose(a.proj.weight, weight, atol=1e-3)


def test_init_random_is_reproducible_from_its_seed():
    spec_in, spec_out = ActivationSpec("nchw", 8, (4, 4)), ActivationSpec("tokens", 6, (4, 4), 1)
    a, b, c = (StitchingLayer(spec_in, spec_out) for _ in range(3))
    a.init_random(7), b.init_random(7), c.init_random(8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.proj.weight, c.proj.weight)


def test_set_strategy_counts_and_freezes_the_right_parts():
    model = stitched("resnet18", 3, "vgg11", 1)
    n_front, n_stitch, n_behind = (sum(p.numel() for p in part.parameters())
                                   for part in (model.front, model.stitch, model.behind))
    expected = {"stitch": n_stitch, "stitch+behind": n_stitch + n_behind, "stitch+front": n_front + n_stitch,
                "full": n_front + n_stitch + n_behind}
    assert set(expected) == set(STRATEGIES)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_stitch  # the default
    for strategy, count in expected.items():
        assert model.set_strategy(strategy) == count
        model.train()
        assert model.front.training == (strategy in ("stitch+front", "full"))
        assert model.behind.training == (strategy in ("stitch+behind", "full"))
        assert model.stitch.training
    with pytest.raises(ValueError):
        model.set_strategy("behind")


def _bn_stats(module):
    return [b.clone() for name, b in module.named_buffers() if "running" in name]


@pytest.mark.parametrize("strategy, stats_may_change", [("stitch", False), ("full", True)])
def test_frozen_batchnorm_statistics_do_not_change_in_a_train_step(strategy, stats_may_change):
    model = stitched("resnet18", 3, "vgg11", 1)
    model.set_strategy(strategy)
    model.train()
    before = _bn_stats(model.front) + _bn_stats(model.behind)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = _bn_stats(model.front) + _bn_stats(model.behind)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    assert unchanged != stats_may_change


def test_stitch_state_round_trip_and_rejections():
    model = stitched("resnet18", 3, "deit_tiny", 2)
    state = model.stitch_state()
    assert set(state) == {"proj.weight", "proj.bias", "prefix.weight", "prefix.bias", "pos_bias"}
    assert all(t.is_contiguous() and not t.requires_grad for t in state.values())
    state["proj.bias"].add_(1.0)  # a clone: the layer itself is untouched
    assert not torch.equal(state["proj.bias"], model.stitch.proj.bias)
    model.load_stitch_state(state)
    assert torch.equal(state["proj.bias"], model.stitch.proj.bias)

    good = model.stitch_state()
    bad_states = {
        "missing key": {k: v for k, v in good.items() if k != "pos_bias"},
        "unexpected key": {**good, "extra": torch.zeros(1)},
        "wrong shape": {**good, "proj.bias": torch.zeros(3)},
        "wrong dtype": {**good, "proj.bias": good["proj.bias"].double()},
        "NaN": {**good, "pos_bias": torch.full_like(good["pos_bias"], float("nan"))},
        "inf": {**good, "proj.weight": good["proj.weight"] / 0.0},
        "not a tensor": {**good, "proj.bias": [0.0] * 192},
    }
    for what, bad in bad_states.items():
        with pytest.raises(IntegrityError):
            model.load_stitch_state(bad)
        assert all(torch.equal(model.stitch.state_dict()[k], v) for k, v in good.items()), what
