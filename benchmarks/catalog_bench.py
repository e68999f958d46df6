"""The catalog's own work against the forward passes it cannot avoid (acceptance (b) of issue 2).

    PYTHONPATH=. python benchmarks/catalog_bench.py [--quick] [--scenarios digits,resnet34-vgg11,deit-s-deit-ti]
                                                    [--repeats 3] [--threads N] [--profile] [--checkpoints DIR]

A catalog build must run both base models over the calibration set once: that is the denominator. Everything
else the build does between "base models ready" and "fine-tune" should be cheap next to it:

  forward        both models, plain `model(x)` under no_grad, once over every calibration batch (denominator)
  fwd@calibrate  the same passes as `shared.build.calibrate` runs them (`block_outputs`, every block kept);
                 printed for reference, it is the forward share of the real pipeline
  cka            CKA accumulation inside `calibrate` (Gram matrices, HSIC products, result)
  specs          `activation_specs` of both models (two batch-1 forwards)
  pair_costs     `shared.build.pair_costs` with latency measurement off: per-block params/FLOPs/activation
                 bytes, and params/FLOPs of the stitch of every (a, b) pair -> the cost matrix of the sweep
  sweep          `default_budgets` (when the config gives none) + `shared.selection.sweep` (Algorithm 1)
  ls_init        a `StitchingLayer` built and `init_least_squares`-ed for every chosen pair

Two ratios are printed, because "the catalog's own work" can be read two ways:
  strict    (cka + sweep + ls_init) / forward   -- what the issue lists: CKA matrix, selection, LS init
  +costs    (cka + specs + pair_costs + sweep + ls_init) / forward   -- also the cost matrix the sweep walks
Base-model training and latency measurement are excluded, as the issue says (pair_costs runs with
measure_latency=False; with budget_metric=latency the build would also time every block).

Scenarios (untrained weights, except --checkpoints for digits; no downloads, digits data resized):
  digits            fleet_configs/digits.yaml as is (its models, widths and sweep; 1x32x32, 256 x 2); with
                    --checkpoints OUT/checkpoints of a `restnet catalog build` of that config, its trained weights
  resnet34-vgg11    fleet_configs/cifar10-resnet34-vgg11.yaml (its budgets), digits at 3x32x32, 256 x 2
  deit-s-deit-ti    fleet_configs/deit-s-deit-ti.yaml (its budgets), pretrained off, img_size 112, 64 x 2

Stages are interleaved inside every repeat (forward, calibrate, pair costs, sweep, LS init, then again), after
one untimed warm-up repeat, so that load from other processes on the shared machine hits all of them alike;
figures are medians over repeats and the ratio is the median of the per-repeat ratios. The forward baseline
goes through the models in the same chunks as `calibrate` (data.calibration.batch_size).

Which pairs the sweep picks depends on the weights (untrained ones pick oddly: e.g. deep front -> first behind
stage on digits, which trained ones do not); LS cost depends only on the pair's shapes.
So the full run also times LS init of EVERY pair (min of 2 runs) and prints what the strict ratio would be had
the sweep chosen the slowest pairs the budgets allow ("LS-worst"), and the same without pairs that upsample
(deep front -> early, larger-grid behind stage: there the residual check, a float32 forward of the stitch that
resizes all source channels to the larger grid, dominates LS init).

Threads: with --threads N the script sets OMP/OPENBLAS/MKL_NUM_THREADS and re-executes itself, so torch and
numpy's BLAS (CKA) both use N. On a 2-core machine shared with other jobs, 2 threads make every small op wait at
OpenMP barriers for a descheduled thread: small-op stages (CKA, LS, FLOP counting) inflate far more than the
forward passes, so run both --threads 1 and the default and compare.
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import build  # noqa: E402
from shared.blocks import activation_specs  # noqa: E402
from shared.build import calibrate, create_base, pair_costs  # noqa: E402
from shared.config import Config, load_config  # noqa: E402
from shared.datasets import calibration_batches, load_splits  # noqa: E402
from shared.errors import BudgetError  # noqa: E402
from shared.selection import default_budgets, sweep  # noqa: E402
from shared.stitching import StitchingLayer  # noqa: E402

SCENARIOS = ("digits", "resnet34-vgg11", "deit-s-deit-ti")
STAGES = ("forward", "fwd@calibrate", "cka", "specs", "pair_costs", "sweep", "ls_init")
TARGET = 2.0
CHUNKED = "chunk" in inspect.signature(calibrate).parameters  # build_catalog passes calibration.batch_size


def scenario_config(name: str, checkpoints: Path | None = None) -> Config:
    """A fleet config from fleet_configs/, made offline: no training, no hub weights, digits data."""
    if name == "digits":
        cfg = load_config(ROOT / "fleet_configs" / "digits.yaml")
        if checkpoints is not None:  # trained weights, as `restnet catalog build` leaves them in OUT/checkpoints
            cfg.large.checkpoint = str(checkpoints / "large.safetensors")
            cfg.small.checkpoint = str(checkpoints / "small.safetensors")
    elif name == "resnet34-vgg11":
        cfg = load_config(ROOT / "fleet_configs" / "cifar10-resnet34-vgg11.yaml")
        cfg.data.image_size, cfg.data.channels = 32, 3
        cfg.data.calibration.examples, cfg.data.calibration.repeats = 256, 2
    elif name == "deit-s-deit-ti":
        cfg = load_config(ROOT / "fleet_configs" / "deit-s-deit-ti.yaml")
        for mc in (cfg.large, cfg.small):
            mc.pretrained = False
            mc.kwargs = {**mc.kwargs, "img_size": 112}
        cfg.data.image_size, cfg.data.channels = 112, 3
        cfg.data.calibration.examples, cfg.data.calibration.repeats = 64, 2
    else:
        raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    cfg.data.dataset, cfg.data.root, cfg.data.download = "digits", None, False
    cfg.large.train = cfg.small.train = None
    cfg.catalog.measure_latency = False
    return cfg


@dataclass
class Setup:
    cfg: Config
    front_model: torch.nn.Module
    behind_model: torch.nn.Module
    front: object
    behind: object
    batches: list


def prepare(name: str, checkpoints: Path | None = None) -> Setup:
    cfg = scenario_config(name, checkpoints)
    torch.manual_seed(cfg.data.seed)
    train, _ = load_splits(cfg.data)
    (lm, lb), (sm, sb) = create_base(cfg.large, cfg), create_base(cfg.small, cfg)
    for m in (lm, sm):
        m.eval()
    (fm, f), (bm, b) = ((lm, lb), (sm, sb)) if cfg.catalog.direction == "slow_to_fast" else ((sm, sb), (lm, lb))
    batches = calibration_batches(train, cfg.data.calibration.examples, cfg.data.calibration.repeats, cfg.data.seed)
    return Setup(cfg, fm, bm, f, b, batches)


def select_pairs(s: Setup, cal, pc) -> tuple[dict, list[float], float | None]:
    """What build_catalog does between the cost matrix and LS init: the budgets, then Algorithm 1 over them.

    Follows both selection APIs: `default_budgets(cka, cost, count)` + `sweep(cka, cost, budgets)`, and the
    banded one, `default_budgets(low, high, count)` between the base models' costs + `sweep(..., floor)`.
    """
    metric = s.cfg.catalog.budget_metric
    cost = pc.metric(metric)
    banded = "floor" in inspect.signature(sweep).parameters
    if s.cfg.catalog.budgets:
        budgets, floor = list(s.cfg.catalog.budgets), 0.0
    elif banded:
        low, high = sorted(build._base_cost(m, s.batches[0][:1], metric) for m in (s.front_model, s.behind_model))
        budgets, floor = default_budgets(low, high, s.cfg.catalog.sweep), low
    else:
        budgets, floor = default_budgets(cal.cka, cost, s.cfg.catalog.sweep), None
    try:
        return (sweep(cal.cka, cost, budgets, floor) if banded else sweep(cal.cka, cost, budgets)), budgets, floor
    except BudgetError:  # untrained or resized models may not fit a paper config's budgets: evenly spaced ones
        defined = cost[np.isfinite(cal.cka)]
        budgets = [float(v) for v in np.linspace(defined.min(), defined.max(), len(budgets))]
        return sweep(cal.cka, cost, budgets), budgets, None


def run_once(s: Setup) -> tuple[dict, dict]:
    """Every stage once, in pipeline order; returns stage seconds and facts about the run."""
    t: dict[str, float] = {}
    chunk = s.cfg.data.calibration.batch_size if CHUNKED else None
    start = time.perf_counter()
    with torch.no_grad():
        for x in s.batches:
            for part in (x.split(chunk) if chunk else [x]):
                s.front_model(part)
                s.behind_model(part)
    t["forward"] = time.perf_counter() - start

    cal = calibrate(s.front, s.behind, s.batches, chunk) if CHUNKED else calibrate(s.front, s.behind, s.batches)
    t["fwd@calibrate"], t["cka"] = cal.seconds_forward, cal.seconds_cka

    start = time.perf_counter()
    f_specs = activation_specs(s.front, s.cfg.input_shape)[:-1]
    b_specs = activation_specs(s.behind, s.cfg.input_shape)[:-1]
    t["specs"] = time.perf_counter() - start

    start = time.perf_counter()
    pc = pair_costs(s.front, s.behind, cal, s.batches[0][:1], f_specs, b_specs, measure_latency=False)
    t["pair_costs"] = time.perf_counter() - start

    start = time.perf_counter()
    chosen, budgets, floor = select_pairs(s, cal, pc)
    t["sweep"] = time.perf_counter() - start

    start = time.perf_counter()
    for a, b in chosen:
        StitchingLayer(f_specs[a], b_specs[b]).init_least_squares(cal.front_acts[a], cal.behind_acts[b])
    t["ls_init"] = time.perf_counter() - start
    cost = pc.metric(s.cfg.catalog.budget_metric)
    eligible = np.isfinite(cal.cka) & (cost <= max(budgets)) & (cost > (-np.inf if floor is None else floor))
    facts = {"cal": cal, "f_specs": f_specs, "b_specs": b_specs, "chosen": sorted(chosen), "budgets": len(budgets),
             "eligible": eligible}
    return t, facts


def ratios(t: dict) -> tuple[float, float]:
    strict = t["cka"] + t["sweep"] + t["ls_init"]
    return strict / t["forward"], (strict + t["specs"] + t["pair_costs"]) / t["forward"]


def ls_all_pairs(facts: dict) -> dict[tuple[int, int], float]:
    """Seconds of LS init for every candidate pair: the faster of two runs (one-off stalls filtered out)."""
    cal, out = facts["cal"], {}
    for a in range(len(facts["f_specs"])):
        for b in range(len(facts["b_specs"])):
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                StitchingLayer(facts["f_specs"][a], facts["b_specs"][b]).init_least_squares(cal.front_acts[a],
                                                                                             cal.behind_acts[b])
                runs.append(time.perf_counter() - start)
            out[a, b] = min(runs)
    return out


def profile_own_work(s: Setup, top: int) -> str:
    """cProfile of one pass of calibrate (its forward passes included), specs, pair_costs, sweep and LS init."""
    prof = cProfile.Profile()
    prof.enable()
    cal = (calibrate(s.front, s.behind, s.batches, s.cfg.data.calibration.batch_size) if CHUNKED
           else calibrate(s.front, s.behind, s.batches))
    f_specs = activation_specs(s.front, s.cfg.input_shape)[:-1]
    b_specs = activation_specs(s.behind, s.cfg.input_shape)[:-1]
    pc = pair_costs(s.front, s.behind, cal, s.batches[0][:1], f_specs, b_specs, measure_latency=False)
    chosen, _, _ = select_pairs(s, cal, pc)
    for a, b in chosen:
        StitchingLayer(f_specs[a], b_specs[b]).init_least_squares(cal.front_acts[a], cal.behind_acts[b])
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def set_threads(n: int | None) -> None:
    """numpy's BLAS reads its thread count at import: set the variables and start again, once."""
    if n and os.environ.get("RESTNET_BENCH_THREADS") != str(n):
        env = {**os.environ, "RESTNET_BENCH_THREADS": str(n), "OMP_NUM_THREADS": str(n),
               "OPENBLAS_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if n:
        torch.set_num_threads(n)


def threads_note() -> str:
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    return f"{torch.get_num_threads()} torch threads, BLAS threads {blas}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true",
                        help="digits and resnet34-vgg11 only, 2 repeats, no all-pairs LS bound")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per scenario (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and numpy's BLAS (re-executes with OMP/OPENBLAS/MKL_NUM_THREADS set)")
    parser.add_argument("--profile", action="store_true", help="also cProfile the own work once per scenario")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="digits scenario with trained weights: a catalog build's OUT/checkpoints folder "
                             "(large.safetensors, small.safetensors), so the sweep picks what it picks in practice")
    args = parser.parse_args()
    set_threads(args.threads)
    names = args.scenarios.split(",") if args.scenarios else (SCENARIOS[:2] if args.quick else SCENARIOS)
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"torch {torch.__version__}, {threads_note()}; {repeats} timed repeats after 1 warm-up; "
          f"target: own work / forward <= {TARGET}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    summary = []
    for name in names:
        s = prepare(name, args.checkpoints)
        cal_cfg = s.cfg.data.calibration
        trained = " (trained checkpoints)" if s.cfg.large.checkpoint else " (untrained)"
        print(f"\n== {name}{trained}: {s.cfg.large.name} -> {s.cfg.small.name} ({s.cfg.catalog.direction}), input "
              f"{s.cfg.input_shape}, calibration {cal_cfg.examples} x {cal_cfg.repeats}, "
              f"{len(s.front.blocks) - 1} x {len(s.behind.blocks) - 1} block pairs")
        run_once(s)  # warm-up: oneDNN primitives, allocator, lazy imports
        runs, facts = [], None
        for _ in range(repeats):
            t, facts = run_once(s)
            runs.append(t)
        med = {k: statistics.median(r[k] for r in runs) for k in STAGES}
        strict = statistics.median(ratios(r)[0] for r in runs)
        full = statistics.median(ratios(r)[1] for r in runs)
        print(f"   chosen pairs {facts['chosen']} over {facts['budgets']} budgets ({s.cfg.catalog.budget_metric})")
        print(f"   {'stage':<14} {'median s':>9} {'x forward':>10}   per repeat")
        for k in STAGES:
            per = " ".join(f"{r[k]:.3f}" for r in runs)
            print(f"   {k:<14} {med[k]:>9.3f} {med[k] / med['forward']:>10.3f}   {per}")
        print(f"   ratio strict (cka+sweep+ls_init)/forward            {strict:6.3f}   "
              f"{'MEETS' if strict <= TARGET else 'MISSES'} <= {TARGET}")
        print(f"   ratio +costs (..+specs+pair_costs)/forward          {full:6.3f}   "
              f"{'MEETS' if full <= TARGET else 'MISSES'} <= {TARGET}")
        print(f"   (vs calibrate's own forward: strict "
              f"{(med['cka'] + med['sweep'] + med['ls_init']) / med['fwd@calibrate']:.3f}, +costs "
              f"{sum(med[k] for k in STAGES[2:]) / med['fwd@calibrate']:.3f})")
        bound = None
        if not args.quick:
            per_pair = ls_all_pairs(facts)
            k = max(len(facts["chosen"]), facts["budgets"])
            slowest = max(per_pair, key=per_pair.get)
            eligible = sorted(v for (a, b), v in per_pair.items() if facts["eligible"][a, b])
            bound = sum(eligible[-k:])
            print(f"   LS init of each of the {len(per_pair)} pairs (min of 2 runs): median "
                  f"{statistics.median(per_pair.values()):.3f}s, max {per_pair[slowest]:.3f}s at {slowest} "
                  f"({facts['f_specs'][slowest[0]].channels}@{facts['f_specs'][slowest[0]].grid} -> "
                  f"{facts['b_specs'][slowest[1]].channels}@{facts['b_specs'][slowest[1]].grid})")
            print(f"   the {k} slowest of the {len(eligible)} pairs the budgets allow take {bound:.3f}s -> "
                  f"strict ratio had the sweep chosen them: "
                  f"{(med['cka'] + med['sweep'] + bound) / med['forward']:.3f}")
            fs, bs = facts["f_specs"], facts["b_specs"]
            same_or_down = sorted(v for (a, b), v in per_pair.items() if facts["eligible"][a, b]
                                  and bs[b].grid[0] * bs[b].grid[1] <= fs[a].grid[0] * fs[a].grid[1])
            if same_or_down:
                print(f"   ... among the {len(same_or_down)} of them that do not upsample (destination grid no larger "
                      f"than the source's): {sum(same_or_down[-k:]):.3f}s -> "
                      f"{(med['cka'] + med['sweep'] + sum(same_or_down[-k:])) / med['forward']:.3f}")
        if args.profile:
            print("   profile of the own work (top by own time):")
            print("\n".join("     " + line for line in profile_own_work(s, 18).splitlines()))
        summary.append((name, med["forward"], strict, full,
                        None if bound is None else (med["cka"] + med["sweep"] + bound) / med["forward"]))

    print(f"\n{'scenario':<16} {'forward s':>9} {'strict':>7} {'+costs':>7} {'LS-worst':>8}   (target <= {TARGET}; "
          "LS-worst: strict ratio had the sweep chosen the slowest pairs within budget)")
    for name, fwd, strict, full, worst in summary:
        cells = [f"{v:.3f}{'' if v <= TARGET else '!'}" for v in (strict, full)]
        w = "-" if worst is None else f"{worst:.3f}{'' if worst <= TARGET else '!'}"
        print(f"{name:<16} {fwd:>9.3f} {cells[0]:>7} {cells[1]:>7} {w:>8}")
    print("('!' marks a ratio above the target)")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes share the CPUs: compare ratios, "
          "not seconds, across runs)")


if __name__ == "__main__":
    main()
