"""Balanced / task-vector-augmented Grams on a synthetic multi-task least-squares problem (float64, < 1 min).

One linear layer `[out, in]`, T tasks. Task t's inputs `X_t` `[in, n]` favour
its own directions (a task-specific spectrum in a shared basis); its task
vector `D_t` acts on its top input directions (WUDI's observation: a
fine-tune's rows lie near its inputs' span), plus noise. Task 0's inputs are
10x louder: its Gram is 100x the others'. Each merge `M` is scored per task
by the relative residual `||(M - D_t) X_t||^2 / ||D_t X_t||^2` (0: the task
kept whole, 1: as bad as the base model).

Then `regmean_sparse` (sparsegpt, with and without refit) prunes the balanced
+ proxy optimum `M*` to a density; "excess" is how much of the achievable
objective gain it loses, `(f(M) - f(M*)) / (f(0) - f(M*))`, `f` the objective
the fit minimises (against magnitude trimming of the same `M*`).

    python examples/benchmarks/bench_gram_balance.py [--tasks 3] [--out 48] [--in 96] [--density 0.1 0.3]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sgtv_jax.merge import hessian_fit as hf
from sgtv_jax.merge.gram_balance import augmented_grams
from sgtv_jax.merge.regmean import regmean


def problem(tasks: int, out: int, cols: int, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Task vectors `[T, out, in]` and inputs `[T, in, n]`; task 0's inputs 10x louder."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    xs, ds = [], []
    for t in range(tasks):
        spectrum = 0.1 + np.exp(-((np.arange(cols) - t * cols / tasks) % cols) / (cols / 8))  # task t's directions
        x = basis @ (spectrum[:, None] * rng.standard_normal((cols, tokens)))
        top = np.linalg.svd(x, full_matrices=False)[0][:, : cols // 8]  # its leading input directions
        d = rng.standard_normal((out, top.shape[1])) @ top.T + 0.1 * rng.standard_normal((out, cols)) / np.sqrt(cols)
        xs.append(x * (10.0 if t == 0 else 1.0))
        ds.append(d)
    return np.stack(ds), np.stack(xs)


def residuals(m: np.ndarray, d: np.ndarray, x: np.ndarray) -> list[float]:
    """Per task `||(M - D_t) X_t||^2 / ||D_t X_t||^2`."""
    return [float(np.sum(((m - d[t]) @ x[t]) ** 2) / np.sum((d[t] @ x[t]) ** 2)) for t in range(len(d))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--out", type=int, default=48)
    ap.add_argument("--in", dest="cols", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--alpha", type=float, default=1.0, help="RegMean's off-diagonal scale (1: least squares)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    d, x = problem(args.tasks, args.out, args.cols, args.tokens, args.seed)
    g = np.einsum("tin,tjn->tij", x, x)
    w = [1.0] * args.tasks
    rows: list[tuple[str, np.ndarray]] = [("task arithmetic (sum)", d.sum(0)), ("mean", d.mean(0))]
    with jax.enable_x64(True):
        for mode, beta in (("none", 0.0), ("trace", 0.0), ("energy", 0.0), ("trace", 0.1), ("trace", 1.0)):
            m = regmean(d, w, grams=g, alpha=args.alpha, gram_norm=mode, proxy_gram=beta)
            rows.append((f"regmean gram_norm={mode} proxy_gram={beta:g}", np.asarray(m)))
        wudi_star = regmean(d, w, grams=np.zeros_like(g), alpha=args.alpha, proxy_gram=1.0)
        rows.append(("proxy alone (WUDI's closed form)", np.asarray(wudi_star)))
    head = " | ".join(f"task {t}" for t in range(args.tasks))
    print(
        f"per-task relative residual ||(M - D_t) X_t||^2 / ||D_t X_t||^2 (task 0's Gram 100x)\n\n| merge | {head} | max |"
    )
    print("| --- |" + " ---: |" * (args.tasks + 1))
    for name, m in rows:
        r = residuals(m, d, x)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r) + f" | {max(r):.3f} |")
    sparse_table(d, x, g, w, args)
    print(f"\n({time.perf_counter() - t0:.1f} s)")


def sparse_table(d: np.ndarray, x: np.ndarray, g: np.ndarray, w: list[float], args: argparse.Namespace) -> None:
    """regmean_sparse at each of `args.density` on the trace-balanced + proxy (beta 1) Grams vs its dense optimum."""
    opts: dict = dict(alpha=args.alpha, gram_norm="trace", proxy_gram=1.0)
    with jax.enable_x64(True):
        aug = np.asarray(augmented_grams(jax.numpy.asarray(g), jax.numpy.asarray(d), "trace", 1.0))
        star = np.asarray(regmean(d, w, grams=g, **opts))

    def f(m: np.ndarray) -> float:  # the objective the fit minimises (exactly with alpha 1)
        return float(sum(np.trace((m - d[t]) @ aug[t] @ (m - d[t]).T) for t in range(len(d))))

    f0, fs = f(np.zeros_like(star)), f(star)
    head = " | ".join(f"task {t}" for t in range(len(d)))
    print(f"\nregmean_sparse on gram_norm=trace proxy_gram=1 (dense optimum M*: f(M*)/f(0) = {fs / f0:.3f})")
    print(
        f"\n| density | trim of M* | f(M)/f(M*) | excess | {head} |\n| --- | --- | ---: | ---: |" + " ---: |" * len(d)
    )
    print("| 1 | none (dense M*) | 1.000 | 0.000 | " + " | ".join(f"{v:.3f}" for v in residuals(star, d, x)) + " |")
    for dens in args.density:
        with jax.enable_x64(True):
            found = {
                "OBS (sparsegpt)": hf.regmean_sparse(d, w, dens, trim="sparsegpt", grams=g, **opts),
                "OBS + refit": hf.regmean_sparse(d, w, dens, trim="sparsegpt", refit=True, grams=g, **opts),
                "magnitude": hf.regmean_sparse(d, w, dens, trim="magnitude", grams=g, **opts),
            }
        for name, m in found.items():
            m = np.asarray(m)
            res = " | ".join(f"{v:.3f}" for v in residuals(m, d, x))
            print(f"| {dens:g} | {name} | {f(m) / fs:.3f} | {(f(m) - fs) / (f0 - fs):.3f} | {res} |")


if __name__ == "__main__":
    main()
