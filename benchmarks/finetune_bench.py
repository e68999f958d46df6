"""Stitch-only fine-tuning with cached front outputs, against no cache and against whole-model fine-tuning
(acceptance (c) of issue 2).

    PYTHONPATH=. python benchmarks/finetune_bench.py [--quick] [--width 0.5] [--examples 1000] [--batch-size 64]
                                                     [--front-cut 8] [--behind-cut 4] [--repeats 3] [--threads N]

One variant, as the paper builds them Slow-to-Fast: cifar_vgg19 blocks [:front_cut] -> 1x1-conv stitch ->
cifar_vgg11 blocks [behind_cut:], on 3x32x32 inputs (the bundled digits, resized; labels are real). The default
cut (VGG19 up to the 4x4 stage, VGG11 from its 512-channel 4x4 stage) leaves about three quarters of the
variant's FLOPs in the front, where the paper's front (the larger model's early blocks) is. Three runs of
`shared.training.finetune`, one epoch each, on a fresh copy of the variant every time:

  cached     strategy "stitch", cached=True: `cache_front_outputs` runs the frozen front once over the data,
             then the epoch trains stitch + behind on the cached outputs. Its figure INCLUDES computing the
             cache; the cache alone is printed too (timed by wrapping `cache_front_outputs`).
  uncached   strategy "stitch", cached=False: the front is recomputed for every batch (no autograd graph).
  full       strategy "full": every weight trained (front, stitch, behind), the paper's whole-model baseline.

The three runs go side by side in one process, in a rotating order, `--repeats` times after one untimed
warm-up; figures are medians and each ratio is the median of the per-repeat ratios. Targets (issue 2):
cached / uncached <= 0.5 and cached / full <= 0.3. The cache is a one-time cost of a fine-tuning run, not of
an epoch, so the script also prints the ratios of the epoch alone and of an E-epoch run (cache once + E cached
epochs against E epochs), extrapolated from the measured medians, for E = catalog.finetune.epochs of
fleet_configs/digits.yaml and of fleet_configs/cifar10-vgg19-vgg11.yaml. No augmentation (TrainConfig's
default: `finetune` caches only un-augmented data, since augmented inputs differ every epoch).

--threads N sets OMP/OPENBLAS/MKL_NUM_THREADS and re-executes the script (torch and BLAS both use N).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shared.training as training  # noqa: E402
from shared import costs as C  # noqa: E402
from shared.blocks import activation_specs, split_model  # noqa: E402
from shared.config import DataConfig, TrainConfig, load_config  # noqa: E402
from shared.datasets import load_splits  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.stitching import StitchedModel, StitchingLayer  # noqa: E402

TARGET_UNCACHED, TARGET_FULL = 0.5, 0.3
RUNS = ("cached", "uncached", "full")

def epoch_horizons() -> list[tuple[int, str]]:
    """catalog.finetune.epochs of the offline default and of the paper-setting VGG config."""
    out = []
    for name in ("digits.yaml", "cifar10-vgg19-vgg11.yaml"):
        try:
            out.append((load_config(ROOT / "fleet_configs" / name).catalog.finetune.epochs, name))
        except Exception:  # noqa: BLE001 - a config being edited must not stop the benchmark
            pass
    return out or [(4, "assumed"), (20, "assumed")]


_cache_seconds: list[float] = []
_real_cache_front_outputs = training.cache_front_outputs


def _timed_cache_front_outputs(*args, **kwargs):
    """`finetune` looks this name up in shared.training: the wrapper times the cache and proves it was used."""
    start = time.perf_counter()
    out = _real_cache_front_outputs(*args, **kwargs)
    _cache_seconds.append(time.perf_counter() - start)
    return out


training.cache_front_outputs = _timed_cache_front_outputs


def make_variant(width: float, front_cut: int, behind_cut: int, channels: int = 3,
                 size: int = 32) -> tuple[StitchedModel, dict]:
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_chans": channels, "width": width}
    front = split_model(create_model("cifar_vgg19", kw), "cifar_vgg19").eval()
    behind = split_model(create_model("cifar_vgg11", kw), "cifar_vgg11").eval()
    shape = (channels, size, size)
    f_spec = activation_specs(front, shape)[front_cut - 1]
    b_spec = activation_specs(behind, shape)[behind_cut - 1]
    stitch = StitchingLayer(f_spec, b_spec)
    stitch.init_random(0)
    model = StitchedModel(list(front.blocks[:front_cut]), stitch, list(behind.blocks[behind_cut:])).eval()
    x1 = torch.zeros(1, *shape)
    flops_front = C.count_flops(model.front, x1)
    info = {
        "front": f"cifar_vgg19[:{front_cut}] ({front.block_names[front_cut - 1]} out {f_spec.channels}@"
                 f"{f_spec.grid[0]}x{f_spec.grid[1]})",
        "behind": f"cifar_vgg11[{behind_cut}:] (in {b_spec.channels}@{b_spec.grid[0]}x{b_spec.grid[1]})",
        "params": C.count_params(model), "stitch_params": C.count_params(stitch),
        "flops": C.count_flops(model, x1), "flops_front": flops_front,
    }
    return model, info


def load_data(examples: int, channels: int = 3, size: int = 32) -> torch.utils.data.TensorDataset:
    train, _ = load_splits(DataConfig(dataset="digits", image_size=size, channels=channels))
    x, y = train.tensors
    reps = -(-examples // len(x))  # tile when more examples are asked for than the split holds
    x, y = x.repeat(reps, 1, 1, 1)[:examples], y.repeat(reps)[:examples]
    return torch.utils.data.TensorDataset(x.contiguous(), y.contiguous())


def run(kind: str, proto: StitchedModel, data, cfg: TrainConfig) -> dict:
    model = copy.deepcopy(proto)
    _cache_seconds.clear()
    start = time.perf_counter()
    if kind == "cached":
        stats = training.finetune(model, data, cfg, "stitch", cached=True, progress=False)
    elif kind == "uncached":
        stats = training.finetune(model, data, cfg, "stitch", cached=False, progress=False)
    else:
        stats = training.finetune(model, data, cfg, "full", progress=False)
    total = time.perf_counter() - start
    if (kind == "cached") != bool(_cache_seconds):
        raise SystemExit(f"{kind}: cache_front_outputs was {'not ' if kind == 'cached' else ''}called; "
                         "finetune no longer caches as this benchmark expects")
    cache = sum(_cache_seconds)
    out = {"total": total, "cache": cache, "epoch": total - cache, "trainable": stats["trainable_params"],
           "loss": stats["loss"]}
    if kind == "cached":  # informational: the same cache built in fine-tuning-sized batches
        start = time.perf_counter()
        _real_cache_front_outputs(model, data, batch_size=cfg.batch_size)
        out["cache_small_batch"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[3:]))
    parser.add_argument("--quick", action="store_true", help="width 0.25, 500 examples, 2 repeats")
    parser.add_argument("--width", type=float, default=None, help="VGG width multiplier (default 0.5)")
    parser.add_argument("--examples", type=int, default=None, help="training examples (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--front-cut", type=int, default=8, help="cifar_vgg19 blocks kept in front")
    parser.add_argument("--behind-cut", type=int, default=4, help="first cifar_vgg11 block kept behind")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and numpy's BLAS (re-executes with OMP/OPENBLAS/MKL_NUM_THREADS set)")
    args = parser.parse_args()
    if args.threads and os.environ.get("RESTNET_BENCH_THREADS") != str(args.threads):
        n = str(args.threads)
        env = {**os.environ, "RESTNET_BENCH_THREADS": n, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
               "MKL_NUM_THREADS": n}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.width or (0.25 if args.quick else 0.5)
    examples = args.examples or (500 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 3)

    proto, info = make_variant(width, args.front_cut, args.behind_cut)
    data = load_data(examples)
    cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"variant {info['front']} -> stitch ({info['stitch_params']:,} params) -> {info['behind']}, width {width}")
    print(f"  {info['params'] / 1e6:.2f}M params, {info['flops'] / 1e6:.1f} MFLOPs/example, front "
          f"{info['flops_front'] / info['flops']:.0%} of the FLOPs; {examples} examples 3x32x32, batch "
          f"{args.batch_size}, 1 epoch, {repeats} repeats after 1 warm-up")

    for kind in RUNS:  # warm-up: oneDNN primitives, allocator
        run(kind, proto, data, cfg)
    results: list[dict] = []
    for r in range(repeats):
        order = RUNS[r % 3:] + RUNS[:r % 3]
        results.append({kind: run(kind, proto, data, cfg) for kind in order})

    def med(kind: str, key: str) -> float:
        return statistics.median(res[kind][key] for res in results)

    def ratio(fn) -> float:
        return statistics.median(fn(res) for res in results)

    print(f"\n  {'run':<10} {'trainable':>11} {'median s':>9}   per repeat")
    for kind in RUNS:
        per = " ".join(f"{res[kind]['total']:.2f}" for res in results)
        print(f"  {kind:<10} {results[0][kind]['trainable']:>11,} {med(kind, 'total'):>9.3f}   {per}")
    per = " ".join(f"{res['cached']['cache']:.2f}" for res in results)
    print(f"  {'  cache':<10} {'':>11} {med('cached', 'cache'):>9.3f}   {per}   (one-time, inside 'cached')")
    per = " ".join(f"{res['cached']['epoch']:.2f}" for res in results)
    print(f"  {'  epoch':<10} {'':>11} {med('cached', 'epoch'):>9.3f}   {per}   (cached epoch alone)")
    per = " ".join(f"{res['cached']['cache_small_batch']:.2f}" for res in results)
    print(f"  {'(cache@' + str(args.batch_size) + ')':<10} {'':>11} {med('cached', 'cache_small_batch'):>9.3f}   {per}"
          f"   (informational: cache_front_outputs with batch_size={args.batch_size} instead of its default)")

    c_u = ratio(lambda res: res["cached"]["total"] / res["uncached"]["total"])
    c_f = ratio(lambda res: res["cached"]["total"] / res["full"]["total"])
    e_u = ratio(lambda res: res["cached"]["epoch"] / res["uncached"]["total"])
    e_f = ratio(lambda res: res["cached"]["epoch"] / res["full"]["total"])
    verdict = lambda value, target: f"{'MEETS' if value <= target else 'MISSES'} <= {target}"  # noqa: E731
    print("\n  ratio                                         value   target")
    print(f"  cached (cache + 1 epoch) / uncached           {c_u:5.3f}   {verdict(c_u, TARGET_UNCACHED)}")
    print(f"  cached (cache + 1 epoch) / full               {c_f:5.3f}   {verdict(c_f, TARGET_FULL)}")
    print(f"  cached epoch alone / uncached epoch           {e_u:5.3f}   {verdict(e_u, TARGET_UNCACHED)}")
    print(f"  cached epoch alone / full epoch               {e_f:5.3f}   {verdict(e_f, TARGET_FULL)}")
    cache, epoch, unc, full = (med("cached", "cache"), med("cached", "epoch"), med("uncached", "total"),
                               med("full", "total"))
    for e, source in epoch_horizons():
        cu, cf = (cache + e * epoch) / (e * unc), (cache + e * epoch) / (e * full)
        print(f"  {e:>2}-epoch run, cache once ({source}, from medians): /uncached {cu:5.3f} "
              f"{verdict(cu, TARGET_UNCACHED)}; /full {cf:5.3f} {verdict(cf, TARGET_FULL)}")
    print(f"  load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
