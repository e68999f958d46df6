"""Textbook float64 formulas the tests hold the production CKA code to (none of them is used in production)."""
import numpy as np
import torch


def _flat(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def u_center(gram: np.ndarray) -> np.ndarray:
    """U-centred copy (..., n, n) of a Gram matrix or a stack of them (Székely & Rizzo 2014); diagonal zero."""
    g = np.array(gram, dtype=np.float64)
    n = g.shape[-1]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 examples, got n={n}")
    diag = np.arange(n)
    g[..., diag, diag] = 0.0
    rows, cols = g.sum(axis=-1), g.sum(axis=-2)
    total = rows.sum(axis=-1)
    g -= rows[..., :, None] / (n - 2)
    g -= cols[..., None, :] / (n - 2)
    g += total[..., None, None] / ((n - 1) * (n - 2))
    g[..., diag, diag] = 0.0
    return g


def hsic_unbiased(k: np.ndarray, l: np.ndarray):
    """Unbiased HSIC as <U(K), U(L)> / (n (n - 3)), pair by pair over any leading (stack) dimensions."""
    n = np.shape(k)[-1]
    value = (u_center(k) * u_center(l)).sum(axis=(-2, -1)) / (n * (n - 3))
    return float(value) if np.ndim(value) == 0 else value


def reference_hsic(x, y) -> float:
    """Song et al. (2012) eq. 5 written out with ones vectors, on raw (uncentred) float64 features."""
    x, y = _flat(x), _flat(y)
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    value = (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one @ k @ l @ one))
    return value / (n * (n - 3))


def reference_cka(batches_x: list, batches_y: list) -> float:
    """Minibatch CKA (Nguyen et al.): sums of per-batch HSIC_u, then the normalisation."""
    xy = sum(reference_hsic(x, y) for x, y in zip(batches_x, batches_y))
    xx = sum(reference_hsic(x, x) for x in batches_x)
    yy = sum(reference_hsic(y, y) for y in batches_y)
    return xy / np.sqrt(xx * yy)


def paper_hsic(x, y) -> float:
    """The ReStNet paper's eq. 6: tr(K H L H) / (n - 1)^2 with H = I - 11'/n, on raw float64 features."""
    x, y = _flat(x), _flat(y)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(x @ x.T @ h @ y @ y.T @ h) / (n - 1) ** 2)


def paper_cka(batches_x: list, batches_y: list) -> float:
    """The paper's eq. 7 on each calibration batch, averaged over the batches (its M repeats)."""
    return float(np.mean([paper_hsic(x, y) / np.sqrt(paper_hsic(x, x) * paper_hsic(y, y))
                          for x, y in zip(batches_x, batches_y)]))


def activations(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 features shaped like real blocks (conv maps, tokens, vectors), sharing a latent so CKA varies."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)

    def block(*shape: int, offset: float) -> torch.Tensor:
        d = int(np.prod(shape))
        w = torch.randn(8, d, generator=g)
        noise = torch.randn(n, d, generator=g) * torch.rand(1, generator=g) * 3
        return (z @ w + noise + offset).relu().reshape(n, *shape)

    feats_a = [block(4, 6, 6, offset=5.0), block(10, 16, offset=0.0), block(300, offset=20.0)]
    feats_b = [block(3, 8, 8, offset=1.0), block(64, offset=50.0)]
    return feats_a, feats_b
