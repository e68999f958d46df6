"""Generic, exact block splitting: trace a model with torch.fx and cut its graph where one tensor carries the state.

One mechanism for every traceable model instead of one hand-written adapter per family. timm keeps its models
FX-traceable for feature extraction and registers the modules and functions a tracer must not enter
(`timm.layers.get_notrace_modules/functions`); we trace with the same registrations, in eval mode, so the pieces run
the same operations in the same order as `model(x)` and their composition is exact.

Where the graph is cut:
- Candidate points are the end and the start of every *block*: a module that is not a primitive layer (torch.nn
  and timm.layers classes: convs, norms, patch embeddings, MLPs, heads) and is a child of the model, of a container
  (Sequential/ModuleList/ModuleDict), or one of several siblings of its class (RegNet's b1, b2, ...).
- A candidate is kept only where exactly one input-dependent value is live across it: a residual path, a shape
  read before the cut or the image itself being needed later rules it out. Parameters and constants are not state:
  each piece reads its own.
- The live value must be a stitchable activation at a probe input: a (N, C, H, W) or (N, H, W, C) map, or
  (N, prefix + H*W, C) tokens; anything else (pooled vectors, tensors with patches folded into the batch, a token
  count that is no grid) is not a boundary, and the pieces on both sides merge.

Each piece is a `torch.fx.GraphModule` that references (never copies) the submodules and parameters it uses, with
the model's own qualified names, so a freshly created model of the same architecture splits into pieces with the
same state_dict keys. Python-level train/eval branches are fixed at eval by the trace (the contract is eval mode);
modules such as BatchNorm and Dropout stay modules and follow each piece's mode.
"""
from __future__ import annotations

import inspect
import itertools
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_notrace_functions, get_notrace_modules

from shared.errors import ModelError

PROBE_BATCH = 2  # batch of the shape probe: a batch dimension that patches were folded into shows as != 2
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass
class Piece:
    name: str
    module: fx.GraphModule
    layout: str  # of the piece's output: nchw, nhwc, tokens, or logits for the last piece
    prefix_tokens: int = 0
    stride: int | None = None  # input pixels per grid cell at the probe (for tokens: the patch size)


class _Tracer(fx.Tracer):
    """torch.fx tracing with timm's leaf modules and autowrapped functions (as timm's feature extraction does)."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def split_pieces(model: nn.Module, name: str, hint: str) -> list[Piece]:
    """The model's graph cut into pieces at every stitchable block boundary; the last piece outputs logits.

    Raises ModelError (with `hint`, what is supported) when the model cannot be traced or has no boundary.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        graph = _trace(model, name, hint)
        return _Splitter(model, graph, name, hint).pieces()
    finally:
        for m, mode in modes.items():
            m.training = mode


def _trace(model: nn.Module, name: str, hint: str) -> fx.Graph:
    """Trace `forward` with every argument but the image fixed to its default (an attention mask of None...)."""
    extra = list(inspect.signature(model.forward).parameters.values())[1:]
    required = [p.name for p in extra if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        raise ModelError(f"cannot split {name}: its forward needs more than an image ({', '.join(required)})", hint)
    concrete = {p.name: p.default for p in extra
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    try:
        return _Tracer().trace(model, concrete_args=concrete)
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, control flow on proxies...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"cannot split {name}: torch.fx cannot trace it ({type(exc).__name__}: {reason})",
                         hint) from None


class _Splitter:
    def __init__(self, model: nn.Module, graph: fx.Graph, name: str, hint: str):
        self.model, self.graph, self.name, self.hint = model, graph, name, hint
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.input = next(n for n in self.nodes if n.op == "placeholder")
        self.dependent = set()  # nodes whose value depends on the image
        for n in self.nodes:
            if n is self.input or any(a in self.dependent for a in n.all_input_nodes):
                self.dependent.add(n)
        self.stacks = [[path for path, _ in n.meta.get("nn_module_stack", {}).values()] for n in self.nodes]

    def pieces(self) -> list[Piece]:
        live, counts = self._live_values()
        candidates = sorted(self._candidate_positions())
        cuts = {}  # what a cut carries (seen through nn.Identity) -> (position, value) of the last cut carrying it
        for pos in candidates:
            value = live[pos]
            if value is not None and value is not self.input and value.op != "output":
                cuts[self._through_identity(value)] = (pos, value)
        cuts = {value: pos for pos, value in cuts.values()}
        if not cuts:
            fewest = min((counts[pos] for pos in candidates if counts[pos] > 1), default=None)
            why = f"at least {fewest} tensors cross each of its {len(candidates)} candidate points" if fewest else \
                "it has no blocks (children of containers or repeated modules) to cut between"
            raise ModelError(f"cannot split {self.name}: no block boundary where a single tensor carries all the "
                             f"state ({why})", self.hint)
        probe_hw, shapes = _probe(self.model, self.graph, list(cuts), self.name, self.hint)
        hint_prefix = getattr(self.model, "num_prefix_tokens", None)
        kept = []
        for value, pos in sorted(cuts.items(), key=lambda kv: kv[1]):
            layout = _layout(shapes[value], probe_hw, hint_prefix) or \
                self._layout_from_users(value, shapes[value], probe_hw)
            if layout is not None and not self._mutated_in_place(value):
                kept.append((pos, value, layout))
        if not kept:
            raise ModelError(f"cannot split {self.name}: no block boundary where a single feature map or token "
                             "sequence (NCHW, NHWC or tokens) carries all the state", self.hint)
        return self._build(kept)

    def _through_identity(self, value: fx.Node) -> fx.Node:
        """The value an nn.Identity chain passes on (a stage without downsampling must not make a block)."""
        while value.op == "call_module" and isinstance(self.model.get_submodule(value.target), nn.Identity) \
                and value.args and isinstance(value.args[0], fx.Node):
            value = value.args[0]
        return value

    def _live_values(self) -> tuple[list[fx.Node | None], list[int]]:
        """For each position, the one input-dependent value still needed after it (None if zero or several), and
        how many there are."""
        last_use = {n: max(self.index[u] for u in n.users) for n in self.dependent if n.users}
        ending: dict[int, list[fx.Node]] = {}
        for n, pos in last_use.items():
            ending.setdefault(pos, []).append(n)
        live, single, counts = set(), [], []
        for pos, n in enumerate(self.nodes):
            if n in last_use:
                live.add(n)
            live.difference_update(ending.get(pos, ()))
            single.append(next(iter(live)) if len(live) == 1 else None)
            counts.append(len(live))
        return single, counts

    def _candidate_positions(self) -> set[int]:
        """Positions just before the first node and at the last node of each run of a block's nodes."""
        blocks: dict[str, bool] = {}
        positions = set()
        for pos, stack in enumerate(self.stacks):
            prev = self.stacks[pos - 1] if pos > 0 else []
            nxt = self.stacks[pos + 1] if pos + 1 < len(self.stacks) else []
            for path in stack:
                if path not in blocks:
                    blocks[path] = _is_block(self.model, path)
                if not blocks[path]:
                    continue
                if path not in prev and pos > 0:
                    positions.add(pos - 1)
                if path not in nxt:
                    positions.add(pos)
        return positions

    def _layout_from_users(self, value: fx.Node, shape: tuple | None,
                           probe_hw: tuple[int, int]) -> tuple[str, int, int] | None:
        """A 4D map whose shape reads both ways (channels == height == width): ask the layer that consumes it."""
        if shape is None or len(shape) != 4 or shape[0] != PROBE_BATCH or not shape[1] == shape[2] == shape[3]:
            return None
        layout = self._consumer_layout(value)
        return None if layout is None else (layout, 0, round(probe_hw[0] / shape[2]))

    def _consumer_layout(self, value: fx.Node) -> str | None:
        for user in value.users:
            if user.op == "call_module":
                layer = self.model.get_submodule(user.target)
                if isinstance(layer, nn.modules.conv._ConvNd):
                    return "nchw"
                if isinstance(layer, (nn.LayerNorm, nn.Linear)):
                    return "nhwc"
            if user.op == "call_function" and user.target is F.conv2d:
                return "nchw"
            if user.op == "call_function" and user.target in (F.layer_norm, F.linear):
                return "nhwc"
            if user.op == "call_method" and user.target == "permute":
                dims = tuple(user.args[1:])
                return {(0, 3, 1, 2): "nhwc", (0, 2, 3, 1): "nchw"}.get(dims)
        return None

    def _mutated_in_place(self, value: fx.Node) -> bool:
        """The next piece would overwrite its input, i.e. the previous piece's output seen by `block_outputs`."""
        for user in value.users:
            if not user.args or user.args[0] is not value:
                continue
            if user.op == "call_module" and getattr(self.model.get_submodule(user.target), "inplace", False):
                return True
            if user.op == "call_method" and user.target.endswith("_") and not user.target.startswith("_"):
                return True
            if user.op == "call_function" and (user.target in _INPLACE_FUNCTIONS or user.kwargs.get("inplace")):
                return True
        return False

    def _build(self, kept: list[tuple[int, fx.Node, tuple[str, int, int]]]) -> list[Piece]:
        output = self.nodes[-1]
        bounds = [(-1, self.input)] + [(pos, value) for pos, value, _ in kept]
        pieces = []
        for k, (start, source) in enumerate(bounds):
            last = k + 1 == len(bounds)
            end = len(self.nodes) - 1 if last else bounds[k + 1][0]
            result = output.args[0] if last else bounds[k + 1][1]
            module, members = self._piece_module(source, range(start + 1, end if last else end + 1), result)
            layout = "logits" if last else kept[k][2][0]
            prefix = 0 if last else kept[k][2][1]
            stride = None if last else kept[k][2][2]
            pieces.append(Piece(self._name(members, k, last), module, layout, prefix, stride))
        names = [p.name for p in pieces]
        for name in set(names):  # a module cut in several pieces: number them in order
            same = [p for p in pieces if p.name == name]
            for i, p in enumerate(same if len(same) > 1 else []):
                p.name = f"{name}[{i}]"
        return pieces

    def _piece_module(self, source: fx.Node, positions: range, result) -> tuple[fx.GraphModule, list[int]]:
        """A GraphModule computing `result` from `source` with the input-dependent nodes at `positions`."""
        graph = fx.Graph()
        env = {source: graph.placeholder("x")}

        def fetch(n: fx.Node):
            if n not in env:  # a parameter, constant or other input-independent value: recomputed here
                assert n not in self.dependent, f"{n.name} crosses a cut that should carry one value only"
                if n.op == "placeholder":  # an argument fixed to its default by the trace
                    env[n] = n.args[0] if n.args else None
                else:
                    for a in n.all_input_nodes:
                        fetch(a)
                    env[n] = graph.node_copy(n, lambda a: env[a])
            return env[n]

        members = []
        for pos in positions:
            n = self.nodes[pos]
            if n in self.dependent and n not in env:
                for a in n.all_input_nodes:
                    fetch(a)
                env[n] = graph.node_copy(n, lambda a: env[a])
                members.append(pos)
        graph.output(fx.node.map_arg(result, fetch))
        graph.lint()
        return fx.GraphModule(self.model, graph, class_name="Block"), members

    def _name(self, members: list[int], k: int, last: bool) -> str:
        """The deepest module holding all of the piece's operations; stem/head at the ends, else the cut's module."""
        if last:
            return "head"
        common = self.stacks[members[0]]
        for pos in members[1:]:
            common = [a for a, _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(common, self.stacks[pos]))]
        if common:
            return common[-1]
        if k == 0:
            return "stem"
        end_stack = self.stacks[members[-1]]
        return end_stack[0] if end_stack else self.nodes[members[-1]].name


def _is_primitive(m: nn.Module) -> bool:
    if isinstance(m, _CONTAINERS):
        return False
    return type(m).__module__.startswith(("torch.", "timm.layers."))


def _is_block(model: nn.Module, path: str) -> bool:
    m = model.get_submodule(path)
    if _is_primitive(m):
        return False
    parent = model.get_submodule(path.rpartition(".")[0])
    if parent is model or isinstance(parent, _CONTAINERS):
        return True
    return sum(type(c) is type(m) for c in parent.children()) >= 2


def _probe_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Image sizes to probe with, most likely first: the model's fixed size if it keeps one, its cfg's, then common
    sizes (a model created with `img_size` may keep no record of it). A function of the model only, so that every
    caller splits the same model the same way."""
    sizes = []
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, int):
            sizes.append((size, size))
        elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            sizes.append(tuple(size))
        if sizes:
            break
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("input_size", ())) == 3:
        sizes.append(tuple(cfg["input_size"][1:]))
    sizes += [(s, s) for s in (224, 256, 192, 160, 128, 96, 64, 32, 384, 512)]
    return list(dict.fromkeys(sizes))


def _input_channels(model: nn.Module, graph: fx.Graph) -> list[int]:
    """Input channel counts to probe with: the first convolution the forward runs (a model's cfg does not follow
    `in_chans`), then the cfg's (for a model whose first operation is not a convolution, e.g. a DCT)."""
    channels = []
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.modules.conv._ConvNd):
            channels.append(model.get_submodule(n.target).in_channels)
            break
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels.append(int(cfg.get("input_size", (3,))[0]))
    return list(dict.fromkeys(channels))


class _ShapeInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str], device: torch.device):
        super().__init__(gm)
        self.wanted, self.device, self.shapes = wanted, device, {}

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        """On the meta device, also the devices the trace baked into calls (`torch.arange(..., device=cpu)`)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if self.device.type != "meta":
            return args, kwargs
        on_meta = fx.node.map_aggregate((args, kwargs), lambda v: self.device if isinstance(v, torch.device) else v)
        return tuple(on_meta[0]), dict(on_meta[1])

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.wanted:
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            self.shapes[n.name] = tuple(value.shape) if floating else None
        return value


class _Recorder(nn.Module):
    """Runs a graph node by node and returns the shapes of the values asked for (a module, for functional_call)."""

    def __init__(self, gm: fx.GraphModule, wanted: list[fx.Node]):
        super().__init__()
        self.gm = gm
        self.wanted = {n.name for n in wanted}

    def forward(self, x: torch.Tensor) -> dict[str, tuple | None]:
        interpreter = _ShapeInterpreter(self.gm, self.wanted, x.device)
        interpreter.run(x)
        return interpreter.shapes


def _probe(model: nn.Module, graph: fx.Graph, values: list[fx.Node], name: str,
           hint: str) -> tuple[tuple[int, int], dict[fx.Node, tuple | None]]:
    """(image size, shapes of `values`) for the first probe size the model takes.

    On the meta device first (shapes without compute or copies), then, for code that reads values or ops without
    meta kernels, with one real pass per size.
    """
    recorder = _Recorder(fx.GraphModule(model, graph), values)
    state = {**dict(recorder.named_parameters()), **dict(recorder.named_buffers())}
    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    param = next(model.parameters(), torch.zeros(()))
    inputs = [(c, h, w) for c in _input_channels(model, graph) for h, w in _probe_sizes(model)]
    errors = []
    for device in ("meta", param.device):
        for c, h, w in inputs:
            x = torch.zeros(PROBE_BATCH, c, h, w, dtype=param.dtype, device=device)
            try:
                if device == "meta":  # tensors the forward creates (arange, zeros) must be meta tensors too
                    with torch.no_grad(), torch.device("meta"):
                        shapes = torch.func.functional_call(recorder, meta, (x,))
                else:
                    with torch.no_grad():
                        shapes = recorder(x)
                return (h, w), {v: shapes.get(v.name) for v in values}
            except Exception as exc:  # any error of the model's own code at this input
                errors.append((str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])
    raise ModelError(f"cannot split {name}: it fails on every probe input (first tried {inputs[0]}: {errors[0]})",
                     hint)


def is_grid(h: int, w: int, height: int, width: int) -> bool:
    """An (h, w) grid of cells has the image's aspect ratio, within one cell (rounding of strided layers)."""
    return h >= 1 and w >= 1 and abs(h * width - w * height) < max(height, width)


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) patch grid of `tokens` patch tokens for an image of height x width, if there is one."""
    near = round(math.sqrt(tokens * height / width))  # h / w = height / width and h * w = tokens
    for h in range(max(near - 1, 1), near + 2):
        if tokens % h == 0 and is_grid(h, tokens // h, height, width):
            return h, tokens // h
    return None


def _layout(shape: tuple | None, probe_hw: tuple[int, int], hint_prefix) -> tuple[str, int, int] | None:
    """(layout, prefix tokens, stride) of an activation from its shape at the probe, or None if not stitchable.

    A 4D map is NCHW when its last two dims are a grid, NHWC when its middle two are; both (channels equal to the
    grid side) is decided by the consumer (`_layout_from_users`). Tokens are (N, prefix + h*w, C), the prefix
    (class/distillation/register tokens) being the model's `num_prefix_tokens` when that fits, else the fewest.
    """
    height, width = probe_hw
    if shape is None or len(shape) not in (3, 4) or shape[0] != PROBE_BATCH:
        return None
    if len(shape) == 4:
        nchw, nhwc = is_grid(shape[2], shape[3], height, width), is_grid(shape[1], shape[2], height, width)
        if nchw == nhwc:
            return None
        grid_h = shape[2] if nchw else shape[1]
        return ("nchw" if nchw else "nhwc"), 0, round(height / grid_h)
    candidates = ([hint_prefix] if isinstance(hint_prefix, int) else []) + list(range(min(shape[1], 65)))
    for prefix in candidates:
        grid = token_grid(shape[1] - prefix, height, width) if shape[1] > prefix else None
        if grid is not None:
            return "tokens", prefix, round(height / grid[0])
    return None
