"""`restnet catalog build`: two base models -> a CKA-ranked catalog of stitched variants.

The expensive part a catalog cannot avoid is running both models over the calibration set once. Everything
else reuses those activations: the CKA matrix is accumulated from them, and every chosen stitching layer is
initialised by least squares from the same tensors. Costs per pair are composed from per-block costs, so the
budget sweep needs no forward pass per candidate.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from shared import costs as C
from shared.artifacts import BlobStore, atomic_write, export_variant
from shared.blocks import BlockedModel, activation_specs, block_outputs, split_model
from shared.catalog import Catalog, ModelInfo, VariantRecord, _finite
from shared.variants import architecture_of
from shared.cka import cka_accumulator
from shared.config import Config, ModelConfig
from shared.datasets import calibration_batches, load_splits
from shared.models import check_input, create_model, save_checkpoint
from shared.selection import default_budgets, sweep
from shared.stitching import StitchedModel, stitching_layer
from shared.training import cache_front_outputs, evaluate, finetune, train_base

FINETUNE_MEMORY_BATCH = 32
ESTIMATOR_NAMES = {  # what cka.json says it holds
    "unbiased": "linear CKA, unbiased HSIC (Song et al. 2012), minibatch-accumulated in float64",
    "paper": "linear CKA, biased HSIC with the centring matrix (ReStNet eq. 6-7), averaged over the repeats",
}


@dataclass
class Calibration:
    """Both models' block outputs over the calibration set, computed once."""

    cka: np.ndarray
    undefined: dict
    front_acts: list[torch.Tensor]  # first calibration batch, every non-head front block
    behind_acts: list[torch.Tensor]
    examples: int
    repeats: int
    estimator: str = "unbiased"
    seconds_forward: float = 0.0
    seconds_cka: float = 0.0


@dataclass
class PairCosts:
    """Cost of every (front block a, behind block b) stitch, composed from per-block costs."""

    params: np.ndarray
    flops: np.ndarray
    memory: np.ndarray
    latency: np.ndarray
    stitch_params: np.ndarray

    def metric(self, name: str) -> np.ndarray:
        return getattr(self, name)


@dataclass
class BuildReport:
    catalog: Catalog
    timings: dict = field(default_factory=dict)


def _model_kwargs(mc: ModelConfig, cfg: Config) -> dict:
    return {"num_classes": cfg.num_classes, "in_chans": cfg.data.channels, **mc.kwargs}


def create_base(mc: ModelConfig, cfg: Config) -> tuple[nn.Module, BlockedModel]:
    """Create a base model, split it and try the data's input shape: every model problem surfaces here,
    before any training time is spent."""
    model = create_model(mc.name, _model_kwargs(mc, cfg), mc.pretrained, mc.checkpoint)
    blocked = split_model(model, mc.name)
    check_input(model, cfg.input_shape, mc.name)
    return model, blocked


def prepare_bases(cfg: Config, train, val, out: Path, progress: bool, log) -> dict[str, tuple]:
    """Both base models: created, trained from scratch where the config says so, evaluated.

    Returns {"large": (model, blocked, accuracy), "small": (...)}; trained weights go to out/checkpoints/.
    """
    created = {role: create_base(getattr(cfg, role), cfg) for role in ("large", "small")}
    ready = {}
    for role, (model, blocked) in created.items():
        mc: ModelConfig = getattr(cfg, role)
        if mc.checkpoint is None and not mc.pretrained and mc.train is not None:
            log(f"training {role} model {mc.name} from scratch ({mc.train.epochs} epochs on {len(train)} examples)")
            train_base(model, train, mc.train, desc=f"train {mc.name}", progress=progress, seed=cfg.data.seed)
            save_checkpoint(model, out / "checkpoints" / f"{role}.safetensors")
        model.eval()
        acc = evaluate(model, val)
        log(f"{role} model {mc.name}: {C.count_params(model) / 1e6:.3f}M params, {len(blocked.blocks)} blocks, "
            f"val accuracy {acc:.4f}")
        ready[role] = (model, blocked, acc)
    return ready


@torch.no_grad()
def calibrate(front: BlockedModel, behind: BlockedModel, batches: list[torch.Tensor],
              chunk: int | None = None, estimator: str = "unbiased") -> Calibration:
    """One forward pass of each model per calibration batch; CKA accumulated over the batches with `estimator`
    (`shared.vocabulary.CKA_ESTIMATORS`).

    `chunk` bounds how many examples go through a model at once (memory), not the CKA batch size."""
    acc = cka_accumulator(estimator, len(front.blocks) - 1, len(behind.blocks) - 1)
    kept_f = kept_b = None
    t_fwd = t_cka = 0.0
    for x in batches:
        t0 = time.perf_counter()
        fa = _outputs_in_chunks(front, x, chunk)[:-1]
        fb = _outputs_in_chunks(behind, x, chunk)[:-1]
        t1 = time.perf_counter()
        acc.update(fa, fb)
        t_cka += time.perf_counter() - t1
        t_fwd += t1 - t0
        if kept_f is None:
            kept_f, kept_b = fa, fb
    t1 = time.perf_counter()
    cka = acc.result()
    t_cka += time.perf_counter() - t1
    return Calibration(cka, acc.undefined_reasons(), kept_f, kept_b, len(batches[0]), len(batches), estimator, t_fwd,
                       t_cka)


def _outputs_in_chunks(bm: BlockedModel, x: torch.Tensor, chunk: int | None) -> list[torch.Tensor]:
    if chunk is None or chunk >= len(x):
        return block_outputs(bm, x)
    parts = [block_outputs(bm, x[i:i + chunk]) for i in range(0, len(x), chunk)]
    return [torch.cat(outs) for outs in zip(*parts)]


@torch.no_grad()
def pair_costs(front: BlockedModel, behind: BlockedModel, cal: Calibration, x1: torch.Tensor, f_specs, b_specs,
               measure_latency: bool, cnn_kernel_size: int = 1) -> PairCosts:
    """Per-pair costs from per-block costs at batch 1. Memory and latency are estimates; params and FLOPs exact."""
    f_block = _block_costs(front, [x1] + [a[:1] for a in cal.front_acts], measure_latency)
    b_block = _block_costs(behind, [x1] + [a[:1] for a in cal.behind_acts], measure_latency)
    na, nb = len(cal.front_acts), len(cal.behind_acts)
    stitch_params, stitch_flops = np.zeros((na, nb)), np.zeros((na, nb))
    seen: dict[tuple, tuple[int, int]] = {}  # a stitch's cost depends only on the two specs and the input shape
    for a in range(na):
        for b in range(nb):
            key = (f_specs[a], b_specs[b], tuple(cal.front_acts[a].shape[1:]))
            if key not in seen:
                layer = stitching_layer(f_specs[a], b_specs[b], cnn_kernel_size)
                seen[key] = C.count_params(layer), C.count_flops(layer, cal.front_acts[a][:1])
            stitch_params[a, b], stitch_flops[a, b] = seen[key]
    f_cum = {k: np.cumsum(v)[:na, None] for k, v in f_block.items()}  # front blocks 0..a
    b_suf = {k: np.cumsum(v[::-1])[::-1][1:nb + 1][None, :] for k, v in b_block.items()}  # behind blocks b+1..end
    params = f_cum["params"] + stitch_params + b_suf["params"]
    flops = f_cum["flops"] + stitch_flops + b_suf["flops"]
    # Memory: weights plus the largest input+output activation pair alive at once along the stitched path.
    f_peak = np.maximum.accumulate(f_block["act_bytes"])[:na, None]
    b_peak = np.maximum.accumulate(b_block["act_bytes"][::-1])[::-1][1:nb + 1][None, :]
    memory = 4 * params + np.maximum(f_peak, b_peak)
    rate = (f_block["latency"].sum() + b_block["latency"].sum()) / max(f_block["flops"].sum() + b_block["flops"].sum(), 1)
    latency = f_cum["latency"] + stitch_flops * rate + b_suf["latency"]
    return PairCosts(params, flops, memory, latency, stitch_params)


def _block_costs(bm: BlockedModel, inputs: list[torch.Tensor], measure_latency: bool) -> dict[str, np.ndarray]:
    """params, flops, output+input activation bytes and latency of each block at batch 1."""
    out = {"params": [], "flops": [], "act_bytes": [], "latency": []}
    for block, x in zip(bm.blocks, inputs):
        y = block(x)
        out["params"].append(C.count_params(block))
        out["flops"].append(C.count_flops(block, x))
        out["act_bytes"].append(x.numel() * x.element_size() + y.numel() * y.element_size())
        out["latency"].append(C.latency_ms(block, x, warmup=1, repeats=3) if measure_latency else 0.0)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def variant_id(front: str, front_cut: int, behind: str, behind_cut: int) -> str:
    return f"{front}.{front_cut}_{behind}.{behind_cut}"


def build_catalog(cfg: Config, out: Path | str, progress: bool = True, log=print) -> BuildReport:
    """The whole pipeline of `restnet catalog build`; writes catalog.json, cka.json, blobs/ and manifests/."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.data.seed)
    t = time.perf_counter()
    train, val = load_splits(cfg.data)
    log(f"data: {cfg.data.dataset}, {len(train)} train / {len(val)} val examples, input {cfg.input_shape}")
    bases = prepare_bases(cfg, train, val, out, progress, log)
    large, small = bases["large"], bases["small"]
    timings["base_models_s"] = time.perf_counter() - t

    (front_cfg, (front_m, front, front_acc)), (behind_cfg, (behind_m, behind, behind_acc)) = (
        ((cfg.large, large), (cfg.small, small)) if cfg.catalog.direction == "slow_to_fast"
        else ((cfg.small, small), (cfg.large, large)))

    batches = calibration_batches(train, cfg.data.calibration.examples, cfg.data.calibration.repeats, cfg.data.seed)
    x1 = batches[0][:1]
    cal = calibrate(front, behind, batches, cfg.data.calibration.batch_size, cfg.data.calibration.estimator)
    timings["calibration_forward_s"], timings["cka_s"] = cal.seconds_forward, cal.seconds_cka
    log(f"CKA: {cal.cka.shape[0]}x{cal.cka.shape[1]} block pairs over {cal.repeats} x {cal.examples} examples"
        + (f", {len(cal.undefined)} undefined" if cal.undefined else ""))

    t = time.perf_counter()
    metric = cfg.catalog.budget_metric
    f_specs = activation_specs(front, cfg.input_shape)[:-1]
    b_specs = activation_specs(behind, cfg.input_shape)[:-1]
    pc = pair_costs(front, behind, cal, x1, f_specs, b_specs,
                    cfg.catalog.measure_latency and metric == "latency", cfg.catalog.stitch_kernel_size)
    timings["pair_costs_s"] = time.perf_counter() - t
    cost = pc.metric(metric)
    if cfg.catalog.budgets:
        budgets, floor = cfg.catalog.budgets, 0.0
    else:  # the paper's range: from the smaller base model's cost to the larger one's
        low, high = sorted(_base_cost(m, x1, metric) for m in (front_m, behind_m))
        budgets, floor = default_budgets(low, high, cfg.catalog.sweep), low
        log(f"budget sweep: {len(budgets)} bands of {metric} from {low:g} to {high:g}")

    t = time.perf_counter()
    chosen = sweep(cal.cka, cost, budgets, floor)
    unfit = [bud for bud in budgets if not any(bud in picked for picked in chosen.values())]
    if unfit:
        log(f"no block pair falls in the band of budget(s) {', '.join(f'{u:g}' for u in unfit)} {metric}")
    timings["selection_s"] = time.perf_counter() - t

    front_info = _model_info(front_cfg, cfg, front, front_m, x1, front_acc)
    behind_info = _model_info(behind_cfg, cfg, behind, behind_m, x1, behind_acc)
    catalog = Catalog(front_info, behind_info, cfg.catalog.direction, metric, list(cfg.input_shape), cfg.num_classes,
                      cfg.data.dataset, [], root=out)
    store = BlobStore(out / "blobs")
    timings["ls_init_s"] = timings["finetune_s"] = timings["measure_s"] = 0.0
    for n, ((a, b), picked) in enumerate(sorted(chosen.items(), key=lambda kv: pc.params[kv[0]])):
        front_cut, behind_cut = a + 1, b + 1
        vid = variant_id(front_cfg.name, front_cut, behind_cfg.name, behind_cut)
        stitch = stitching_layer(f_specs[a], b_specs[b], cfg.catalog.stitch_kernel_size)
        t = time.perf_counter()
        if cfg.catalog.init == "least_squares":
            residual = stitch.init_least_squares(cal.front_acts[a], cal.behind_acts[b])
        else:
            stitch.init_random(cfg.data.seed)
            residual = float("nan")
        timings["ls_init_s"] += time.perf_counter() - t
        blocks_f, blocks_b = list(front.blocks[:front_cut]), list(behind.blocks[behind_cut:])
        if cfg.catalog.strategy != "stitch":  # other strategies change base blocks: give each variant its own
            blocks_f, blocks_b = copy.deepcopy(blocks_f), copy.deepcopy(blocks_b)
        model = StitchedModel(blocks_f, stitch, blocks_b).eval()
        acc_init = evaluate(model, val)
        t = time.perf_counter()
        stats = finetune(model, train, cfg.catalog.finetune, cfg.catalog.strategy, desc=f"fine-tune {vid}",
                         progress=progress, seed=cfg.data.seed)
        timings["finetune_s"] += time.perf_counter() - t
        acc = evaluate(model, val)
        t = time.perf_counter()
        measured = measure_variant(model, x1, train, cfg.catalog.measure_latency)
        timings["measure_s"] += time.perf_counter() - t
        rec = VariantRecord(
            id=vid, front_model=front_cfg.name, behind_model=behind_cfg.name, front_cut=front_cut,
            behind_cut=behind_cut, direction=cfg.catalog.direction, cka=float(cal.cka[a, b]),
            stitch_kind=stitch.kind, trainable_params=stats["trainable_params"], budgets=picked,
            accuracy=acc, accuracy_init=acc_init, **measured)
        arch = architecture_of(front_info, behind_info, front_cut, behind_cut, f_specs[a], b_specs[b],
                               stitch.kernel_size)
        catalog.add_manifest(rec, export_variant(model, vid, 1, arch, store, rec.manifest_record()))
        catalog.variants.append(rec)
        log(f"[{n + 1}/{len(chosen)}] {vid}: cka {rec.cka:.3f}, {rec.params / 1e6:.3f}M params, "
            f"LS residual {residual:.3f}, accuracy {acc_init:.4f} -> {acc:.4f}")
    catalog.save(out)
    write_cka(out / catalog.cka_file, cal, front, behind, pc.metric(metric), chosen, metric, budgets, floor)
    return BuildReport(catalog, timings)


def _base_cost(model: nn.Module, x1: torch.Tensor, metric: str) -> float:
    """A base model's cost in the budget metric (the ends of the default budget sweep)."""
    measure = {"params": lambda: C.count_params(model), "flops": lambda: C.count_flops(model, x1),
               "memory": lambda: C.inference_peak_bytes(model, x1), "latency": lambda: C.latency_ms(model, x1)}
    return float(measure[metric]())


def _model_info(mc: ModelConfig, cfg: Config, bm: BlockedModel, model: nn.Module, x1: torch.Tensor,
                accuracy: float) -> ModelInfo:
    flops = C.count_flops(model, x1)
    return ModelInfo(mc.name, _model_kwargs(mc, cfg), bm.family, list(bm.block_names), C.count_params(model),
                     flops, accuracy, mc.checkpoint, macs=flops // C.FLOPS_PER_MAC)


def measure_variant(model: StitchedModel, x1: torch.Tensor, train, measure_latency: bool) -> dict:
    """Measured costs of a built variant: exact params, FLOPs and MACs, peak memory, latency, fine-tune memory."""
    model.set_strategy("stitch")
    cached = cache_front_outputs(model, torch.utils.data.Subset(train, range(FINETUNE_MEMORY_BATCH)))
    h, y = cached.tensors
    model.train()
    ft = C.training_peak_bytes(model.forward_from_front, nn.ModuleList([model.stitch, model.behind]), h, y)
    model.eval()
    flops = C.count_flops(model, x1)
    return {
        "params": C.count_params(model),
        "flops": flops,
        "macs": flops // C.FLOPS_PER_MAC,
        "memory_bytes": C.inference_peak_bytes(model, x1),
        "finetune_memory_bytes": ft,
        "latency_ms": C.latency_ms(model, x1) if measure_latency else None,
    }


def write_cka(path: Path, cal: Calibration, front: BlockedModel, behind: BlockedModel, cost: np.ndarray,
              chosen: dict, metric: str, budgets: list[float], floor: float) -> None:
    doc = {
        "front_blocks": list(front.block_names[:-1]),
        "behind_blocks": list(behind.block_names[:-1]),
        "matrix": cal.cka.tolist(),
        "undefined": {str(k): v for k, v in cal.undefined.items()},
        "examples": cal.examples,
        "repeats": cal.repeats,
        "estimator": ESTIMATOR_NAMES[cal.estimator],
        "budget_metric": metric,
        "cost": cost.tolist(),
        "budgets": sorted(budgets),
        "budget_floor": floor,
        "chosen": [[a, b] for a, b in chosen],
    }
    atomic_write(path, json.dumps(_finite(doc)).encode())
