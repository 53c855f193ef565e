"""A synthetic linear layer on which the data-free merges can be compared without a model.

    python examples/benchmarks/svd_merge_proxy.py [--shared N] [--full] [--seeds S]

Three tasks, each with inputs in its own random 16-dimensional subspace of a
128-wide layer (plus, with `--shared N`, a common N-dimensional one at half the
scale); each task vector is gradient-like, output errors times its inputs
(`[96, 128]`, rank <= 16 + N; output errors of rank 6, or with `--full` of full
rank with a power-law spectrum), of strengths 1.0 / 1.3 / 0.8, plus 1 % dense
noise. Printed per task: the share kept, `1 - ||(M - D_t) X_t||^2 / ||D_t X_t||^2`
on held-out inputs of task t, averaged over the seeds, and its minimum over
tasks. RegMean on the true input Grams is the calibrated reference.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from sgtv_jax.merge import get_method, regmean  # noqa: E402


def problem(rng, shared: int, full: bool, tasks: int = 3, out: int = 96, inn: int = 128, own: int = 16, n: int = 400):
    """Task vectors `[T, out, in]`, their training inputs and held-out inputs (`[in, n]` each)."""
    common = np.linalg.qr(rng.standard_normal((inn, shared)))[0]
    scale = np.r_[np.full(own, 1.0), np.full(shared, 0.5)][:, None]
    deltas, train, held = [], [], []
    for t in range(tasks):
        basis = np.hstack([np.linalg.qr(rng.standard_normal((inn, own)))[0], common])
        x = basis @ (scale * rng.standard_normal((own + shared, n)))
        if full:
            q = np.linalg.qr(rng.standard_normal((out, out)))[0]
            e = q @ (np.arange(1, out + 1)[:, None] ** -0.8 * rng.standard_normal((out, n))) / np.sqrt(n)
        else:
            e = rng.standard_normal((out, 6)) @ rng.standard_normal((6, n)) / np.sqrt(n)
        d = (e @ x.T) / np.sqrt(n) * (1.0, 1.3, 0.8)[t % 3]
        d += 0.01 * np.linalg.norm(d) / np.sqrt(out * inn) * rng.standard_normal(d.shape)
        deltas.append(d)
        train.append(x)
        held.append(basis @ (scale * rng.standard_normal((own + shared, n))))
    return np.stack(deltas), train, held


def merges(d: np.ndarray, train: list[np.ndarray]) -> dict[str, np.ndarray]:
    ones = [1.0] * len(d)
    out = {
        "task_arithmetic (sum)": d.sum(0),
        "task_arithmetic w=1/T": d.mean(0),
        "ties d=0.1 (magnitude)": get_method("ties")(d, ones, [0.1] * len(d), trim="magnitude"),
        "wudi (defaults)": get_method("wudi")(d),
    }
    for a in (0.5, 1.0, 2.0):
        for m in ("tsv", "iso_c", "iso_cts"):
            out[f"{m} alpha={a}"] = get_method(m)(d, alpha=a)
    out["regmean (true input Grams)"] = regmean(d, ones, grams=np.stack([x @ x.T for x in train]), alpha=1.0)
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list[list[float]]] = {}
    for seed in range(args.seeds):
        d, train, held = problem(np.random.default_rng(seed), args.shared, args.full)
        for name, m in merges(d, train).items():
            kept = [1 - np.sum(((m - dt) @ x) ** 2) / np.sum((dt @ x) ** 2) for dt, x in zip(d, held)]
            rows.setdefault(name, []).append(kept)
    print(f"{'merge':28s} task0 task1 task2   min")
    for name, v in rows.items():
        mean = np.mean(v, axis=0)
        print(f"{name:28s} " + " ".join(f"{x:5.2f}" for x in mean) + f" {mean.min():5.2f}")


if __name__ == "__main__":
    main()
