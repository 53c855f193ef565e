"""Plain float64 NumPy oracles of the OBS semantics (stated in `sgtv_jax/obs.py`'s module
docstring), written for reading, not speed.

Deliberately independent of the library: a Python loop over columns,
SparseGPT's cholesky -> inverse -> cholesky, a stable argsort for the prune set.
"""

from __future__ import annotations

import numpy as np


def hessian(batches, masks=None) -> np.ndarray:
    """(2/n_sequences) * sum x x^T over unmasked tokens; batches of [batch, seq, cols]."""
    cols = batches[0].shape[-1]
    total = np.zeros((cols, cols))
    n = 0
    for j, x in enumerate(batches):
        x = np.asarray(x, np.float64)
        m = np.ones(x.shape[:2]) if masks is None else np.asarray(masks[j], np.float64)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if m[b, t]:
                    total += np.outer(x[b, t], x[b, t])
        n += x.shape[0]
    return 2.0 * total / n


def inverse_factor(h: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(hinv).T  # upper, U^T U = H^-1
    return u, dead


def obs_prune(delta, h, density=None, prunen=0, prunem=0, blocksize=128, percdamp=0.01, u=None):
    """Returns (pruned, pruned-entry mask, loss)."""
    w = np.array(delta, np.float64)
    rows, cols = w.shape
    if u is None:
        u, dead = inverse_factor(h, percdamp)
        w[:, dead] = 0
    mask = np.zeros_like(w, dtype=bool)
    q = np.zeros_like(w)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        m1 = np.zeros_like(w1, dtype=bool)
        if prunem == 0:
            scores = (w1**2 / np.diag(u1) ** 2).ravel()
            k = round((1 - density) * rows * (i2 - i1))
            order = np.argsort(scores, kind="stable")
            m1.ravel()[order[:k]] = True
        for i in range(i2 - i1):
            if prunem and i % prunem == 0:
                s = w1[:, i : i + prunem] ** 2 / np.diag(u1)[i : i + prunem] ** 2
                order = np.argsort(s, axis=1, kind="stable")
                for r in range(rows):
                    m1[r, i + order[r, :prunen]] = True
            col = w1[:, i]
            qc = np.where(m1[:, i], 0.0, col)
            e = (col - qc) / u1[i, i]
            loss += np.sum((col - qc) ** 2) / u1[i, i] ** 2 / 2
            w1[:, i:] -= np.outer(e, u1[i, i:])
            q[:, i1 + i] = qc
            err1[:, i] = e
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q, mask, loss


def damped(h, percdamp: float) -> np.ndarray:
    """The matrix the sweep factors (no dead columns): `H + percdamp * mean(diag H) * I`, float64."""
    h = np.asarray(h, np.float64)
    return h + percdamp * np.mean(np.diag(h)) * np.eye(h.shape[0])


def masked_least_squares(delta, h, keep, percdamp: float = 0.01) -> np.ndarray:
    """The exact refit: per row r with kept set S, `D'[r, S] = A_SS^-1 (A D[r])_S`, zero elsewhere.

    `A = damped(h)`; each row is one `np.linalg.solve` of its own kept block, in
    float64. This minimises `weighted_error` over every D' with D'[~keep] = 0.
    """
    a = damped(h, percdamp)
    d = np.asarray(delta, np.float64)
    out = np.zeros_like(d)
    for r in range(d.shape[0]):
        s = np.asarray(keep[r], bool)
        if s.any():
            out[r, s] = np.linalg.solve(a[np.ix_(s, s)], (a @ d[r])[s])
    return out


def weighted_error(delta, pruned, h, percdamp: float = 0.01) -> float:
    """The refit's objective `sum_r (D - D')[r] A (D - D')[r]^T` with `A = damped(h)`."""
    e = np.asarray(delta, np.float64) - np.asarray(pruned, np.float64)
    return float(np.einsum("ri,ij,rj->", e, damped(h, percdamp), e))


def correlated_inputs(rng, tokens: int, cols: int, decay: float = 1.0) -> np.ndarray:
    """[tokens, cols] inputs with correlated features, like real activations.

    Features are mixed by a random rotation and their spectrum decays as
    k^-decay. (An exactly low-rank X with tiny noise is the degenerate case in
    which the 1% damping dominates H and OBS is no better than magnitude at
    density 0.1; real layer inputs are not like that.)
    """
    scales = np.arange(1, cols + 1, dtype=np.float64) ** -decay
    basis, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return (rng.standard_normal((tokens, cols)) * scales) @ basis.T
