"""All-pairs minibatch CKA on identical activations: our CKAAccumulator against two published libraries.

    PYTHONPATH=. python benchmarks/cka_bench.py [--blocks 12] [--n 256] [--batches 3] [--repeats 3] [--threads T]
    PYTHONPATH=. python benchmarks/cka_bench.py --config fleet_configs/digits.yaml [--n 256] ...

Activations: by default synthetic CNN-like block outputs (`--blocks` per model, 1k-32k features each); with
`--config`, the real block outputs of that fleet config's two models (random weights and random inputs of the
config's input shape: timings and agreement do not depend on what the weights learned).

Where the time goes: every method needs each block's Gram matrix (n^2 d multiply-adds); torch-cka computes model
B's Gram once per pair instead of once per batch and adds three n x n matrix products per pair. Its cost over ours
is therefore large when blocks are many and narrow relative to n, and small when a few wide blocks dominate.

Methods, all computing the same estimator (unbiased HSIC summed over minibatches, Nguyen et al. 2021):
  ours         shared.cka.CKAAccumulator: one Gram per block and batch (BLAS syrk on float32 chunks of features
               shifted by the first example, summed in float64), all cross terms in one float64 product.
  torch-cka    torch-cka==0.21 `CKA.compare`: loops over pairs and recomputes model B's Gram for every pair.
  pytorch-cka  pytorch-cka==1.1.3 `compute_cka`: one Gram per block, all pairs in one einsum, float32,
               result clamped to [0, 1]. (Its `cka_from_features` takes a single batch only; `compute_cka`
               is its multi-batch path with the same `hsic()`.)
  reference    written here: float64 throughout, per-pair formula of Song et al. (2012) with ones vectors,
               on features centred in float64 (exact for HSIC_u; keeps the formula free of cancellation).

The two libraries are never project dependencies: they are installed into benchmarks/.ref-venv, whose .pth
file reuses this interpreter's site-packages (torch is not reinstalled). A worker process in that venv loads
the same activations (saved with np.save) and times the three methods round-robin, so that load from other
processes on a shared machine hits them alike; the best of the rounds is kept. Both libraries hook module
outputs, so the worker replays the saved activations through identity modules fed by a DataLoader.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REF_VENV = ROOT / "benchmarks" / ".ref-venv"
REF_PACKAGES = ["torch-cka==0.21", "pytorch-cka==1.1.3"]
METHODS = ["ours", "torch-cka", "pytorch-cka"]
# Flattened block output sizes, CNN-like (channels x spatial shrinking with depth); B is the smaller model.
DIMS_A = [32768, 32768, 16384, 16384, 16384, 8192, 8192, 8192, 4096, 4096, 2048, 2048]
DIMS_B = [16384, 16384, 8192, 8192, 8192, 4096, 4096, 4096, 2048, 2048, 1024, 1024]


def block_maps(dims: list[int], g: torch.Generator) -> list:
    """Per block: latent-to-feature weights, noise level and offset."""
    def uniform(high: float) -> float:
        return high * float(torch.rand(1, generator=g))

    return [(torch.randn(32, d, generator=g) / 4, uniform(2), uniform(2)) for d in dims]


def make_activations(dims: list[int], z: torch.Tensor, g: torch.Generator, maps: list) -> list[torch.Tensor]:
    """ReLU features (n, C, 8, 8) driven by a latent that rotates with depth, so near-depth blocks are similar."""
    feats = []
    for d, t, (w, noise, offset) in zip(dims, np.linspace(0, 1.5, len(dims)), maps):
        h = np.cos(t) * z[:, :32] + np.sin(t) * z[:, 32:]
        x = (h @ w + noise * torch.randn(len(z), d, generator=g) + offset).relu()
        feats.append(x.reshape(len(z), d // 64, 8, 8))
    return feats


def reference_cka(batches_a: list, batches_b: list) -> np.ndarray:
    """Float64 minibatch CKA, pair by pair, with the ones-vector formula (independent of shared.hsic)."""

    def grams(feats):
        out = []
        for f in feats:
            x = f.reshape(len(f), -1).numpy().astype(np.float64)
            x -= x.mean(axis=0)
            k = x @ x.T
            np.fill_diagonal(k, 0.0)
            out.append(k)
        return out

    def hsic(k, l):
        n = len(k)
        one = np.ones(n)
        kl = k @ l
        value = np.trace(kl) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ kl @ one)
        return value / (n * (n - 3))

    n_a, n_b = len(batches_a[0]), len(batches_b[0])
    xy, xx, yy = np.zeros((n_a, n_b)), np.zeros(n_a), np.zeros(n_b)
    for fa, fb in zip(batches_a, batches_b):
        ka, kb = grams(fa), grams(fb)
        xx += [hsic(k, k) for k in ka]
        yy += [hsic(l, l) for l in kb]
        xy += [[hsic(k, l) for l in kb] for k in ka]
    return xy / np.sqrt(np.outer(xx, yy))


def ensure_ref_venv() -> Path:
    """Create benchmarks/.ref-venv (reusing this interpreter's packages via a .pth) with the two libraries."""
    python = REF_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
        ref_site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        (Path(ref_site) / "parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if subprocess.run([str(python), "-c", "import torch_cka, cka"], check=False, capture_output=True).returncode:
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", *REF_PACKAGES],
            check=False, capture_output=True, text=True,
        )
        if pip.returncode != 0:
            sys.exit(f"installing {' '.join(REF_PACKAGES)} into {REF_VENV} failed:\n{pip.stderr}")
    return python


def count_blocks(data: Path, prefix: str) -> int:
    return len(list(data.glob(f"{prefix}_0_*.npy")))


def worker(data: Path, batches: int, n: int, repeats: int) -> None:
    """Runs inside .ref-venv: time the three methods round-robin, save their matrices, print best times as JSON."""
    import cka as pytorch_cka
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA as TorchCKA

    from shared.cka import CKAAccumulator

    def load(prefix: str, n_blocks: int) -> list[list[torch.Tensor]]:
        return [
            [torch.from_numpy(np.load(data / f"{prefix}_{k}_{i}.npy")) for i in range(n_blocks)] for k in range(batches)
        ]

    class Replay(nn.Module):
        """Emits the saved activations of batch k through identity blocks, where the libraries' hooks see them."""

        def __init__(self, feats: list[list[torch.Tensor]]):
            super().__init__()
            self.feats = feats
            self.blocks = nn.ModuleList(nn.Identity() for _ in feats[0])

        def forward(self, idx: torch.Tensor) -> None:
            for block, f in zip(self.blocks, self.feats[int(idx[0]) // n]):
                block(f)

    n_blocks_a, n_blocks_b = count_blocks(data, "a"), count_blocks(data, "b")
    feats_a, feats_b = load("a", n_blocks_a), load("b", n_blocks_b)
    model_a, model_b = Replay(feats_a), Replay(feats_b)
    layers_a = [f"blocks.{i}" for i in range(n_blocks_a)]
    layers_b = [f"blocks.{i}" for i in range(n_blocks_b)]
    loader = DataLoader(TensorDataset(torch.arange(batches * n)), batch_size=n)

    def run_ours():
        acc = CKAAccumulator(n_blocks_a, n_blocks_b)
        for fa, fb in zip(feats_a, feats_b):
            acc.update(fa, fb)
        return acc.result()

    def run_torch_cka():
        ref = TorchCKA(model_a, model_b, "A", "B", layers_a, layers_b, device="cpu")
        ref.compare(loader, loader)
        return ref.hsic_matrix.double().numpy()

    def run_pytorch_cka():
        return pytorch_cka.compute_cka(
            model_a, model_b, loader, layers=layers_a, model2_layers=layers_b, device="cpu", progress=False
        )[0].double().numpy()

    runs = dict(zip(METHODS, [run_ours, run_torch_cka, run_pytorch_cka]))
    best = {name: float("inf") for name in METHODS}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            matrix = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            np.save(data / f"{name}.npy", matrix)
    print(json.dumps(best))


def synthetic_batches(args) -> tuple[list, str]:
    dims_a, dims_b = DIMS_A[: args.blocks], DIMS_B[: args.blocks]
    g = torch.Generator().manual_seed(0)
    maps_a, maps_b = block_maps(dims_a, g), block_maps(dims_b, g)
    batches = []
    for _ in range(args.batches):
        z = torch.randn(args.n, 64, generator=g)
        batches.append((make_activations(dims_a, z, g, maps_a), make_activations(dims_b, z, g, maps_b)))
    return batches, "synthetic CNN-like activations"


def model_batches(args) -> tuple[list, str]:
    """Every block's output of the config's two models (random weights) on random inputs of its input shape."""
    from dataclasses import replace

    from shared.blocks import block_outputs
    from shared.build import create_base
    from shared.config import load_config

    cfg = load_config(args.config)
    # Train mode: BatchNorm on batch statistics keeps random-weight activations in a healthy range (its default
    # running statistics let them vanish with depth, and constant features have no CKA).
    models = [create_base(replace(mc, pretrained=False, checkpoint=None), cfg)[1].train()
              for mc in (cfg.large, cfg.small)]
    g = torch.Generator().manual_seed(0)
    batches = []
    with torch.no_grad():
        for _ in range(args.batches):
            x = torch.randn(args.n, *cfg.input_shape, generator=g)
            batches.append(tuple([f.contiguous() for f in block_outputs(bm, x)] for bm in models))
    return batches, f"block outputs of {cfg.large.name} and {cfg.small.name} ({args.config}, random weights)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12, help="synthetic activations: blocks per model (at most 12)")
    parser.add_argument("--config", help="fleet config YAML: time on its two models' real block outputs instead")
    parser.add_argument("--n", type=int, default=256, help="examples per minibatch")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, all methods")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.batches, args.n, args.repeats)
        return

    batches, source = model_batches(args) if args.config else synthetic_batches(args)
    dims_a, dims_b = ([f[0].numel() for f in feats] for feats in batches[0])
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; {source}: "
          f"{len(dims_a)} x {len(dims_b)} blocks, {args.batches} batches of n={args.n}, "
          f"feature dims A {min(dims_a)}-{max(dims_a)} (sum {sum(dims_a)}), B {min(dims_b)}-{max(dims_b)} "
          f"(sum {sum(dims_b)})")
    python = ensure_ref_venv()

    start = time.perf_counter()
    ref = reference_cka([fa for fa, _ in batches], [fb for _, fb in batches])
    ref_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for k, (fa, fb) in enumerate(batches):
            for prefix, feats in (("a", fa), ("b", fb)):
                for i, f in enumerate(feats):
                    np.save(data / f"{prefix}_{k}_{i}.npy", f.numpy())
        del batches  # the worker loads its own copy
        proc = subprocess.run(
            [str(python), __file__, "--worker", str(data), "--n", str(args.n),
             "--batches", str(args.batches), "--repeats", str(args.repeats), "--threads", str(args.threads)],
            check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            sys.exit(f"benchmark worker failed:\n{proc.stderr}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        results = {name: np.load(data / f"{name}.npy") for name in METHODS}

    print(f"reference CKA values range {ref.min():.4f} .. {ref.max():.4f} (float64 reference: {ref_seconds:.1f} s)\n")
    print(f"{'method':<12} {'seconds':>9} {'ours is x faster':>17} {'max |diff| to float64 reference':>33}")
    for name in METHODS:
        speed = f"{times[name] / times['ours']:.1f}" if name != "ours" else "-"
        print(f"{name:<12} {times[name]:>9.3f} {speed:>17} {np.abs(results[name] - ref).max():>33.2e}")
    clamped = ref < 0
    if clamped.any():
        unclamped = np.abs(results["pytorch-cka"] - ref)[~clamped].max()
        print(f"{clamped.sum()} reference values are negative; pytorch-cka clamps them to 0. On the other entries "
              f"its max |diff| is {unclamped:.2e}.")
    a, b, n = len(dims_a), len(dims_b), args.n
    # Multiply-adds per batch / n^2. Ours: every Gram once, each by syrk (half a full product: it is symmetric);
    # the all-pairs HSIC terms are one (a x n^2/2) @ (n^2/2 x b) product. torch-cka: model A's Grams once,
    # model B's once per pair, and per pair two n x n products (K @ L, L @ L) plus one per block of A (K @ K).
    ours = 0.5 * (sum(dims_a) + sum(dims_b) + a * b)
    theirs = sum(dims_a) + a * sum(dims_b) + (2 * a * b + a) * n
    print(f"\nbest of {args.repeats} rounds; load average at the end {os.getloadavg()[0]:.1f} (shared machine)")
    print(f"Gram matrices per batch: ours {a + b}, pytorch-cka {a + b}, torch-cka {a + a * b}. Counting multiply-adds "
          f"(Grams and n x n products), torch-cka does {theirs / ours:.1f}x the work of ours here.")


if __name__ == "__main__":
    from shared.errors import RestnetError

    try:
        main()
    except RestnetError as exc:  # a bad --config: one line and exit code, as the restnet commands give them
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
