"""Compare merge methods on real task vectors of a small Flax NNX classifier.

    python examples/compare_merging_methods.py [--out compare_merging_methods.png]

1. Pre-train a base MLP (32 -> 64 -> 64 -> 4, ReLU) with optax on a generic
   task over a mixture of input regions; fine-tune three copies, each on its own
   synthetic task (its own input region and teacher), so the task vectors are
   real fine-tuning updates. Inputs are strongly correlated (8 latent factors
   mixed into 32 features), the case where OBS compensation matters.
2. Calibration: for every linear layer, the Hessian / Gram matrix of its inputs
   under the *base* model on each task's calibration data (`sgtv_jax.hessian`),
   `H_t` `[in, in]`; OBS trims task t's vector with `H_t`, RegMean uses them as Grams.
3. Merge with TA, TIES, DARE, TIES+SparseGPT, DARE+SparseGPT, Wanda-TIES and
   RegMean at densities 0.1, 0.2, 0.3, 0.5 (biases: the method's data-free trim)
   and print: merge time, each task's test accuracy of the merged model, and the
   reconstruction error `mean_{t, layer} ||(W_merged - W_t) X_t|| / ||(W_t - W_0) X_t||`
   (`X_t`: base-model inputs on task t). Rows marked "ft" use Hessians / Grams
   of the fine-tuned models' own inputs instead (RegMean's original recipe).
4. Write a PNG of quality against density per method.

All methods use their defaults (mergekit's) with weight 1 per model. Runs in
well under 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sgtv_jax.merge as M
from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update

D_IN, HIDDEN, CLASSES, LATENT, TASKS = 32, 64, 4, 8, 3
DENSITIES = (0.1, 0.2, 0.3, 0.5)
LAYERS = ("l1", "l2", "l3")


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.l3 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

    def layer_inputs(self, x):
        """Inputs `[n, in]` of l1, l2, l3."""
        h1 = jax.nn.relu(self.l1(x))
        return {"l1": x, "l2": h1, "l3": jax.nn.relu(self.l2(h1))}


# --------------------------------------------------------------------------- data


class Tasks:
    """Task t: inputs around its own centre `mu_t`, labels `argmax(A_t (x - mu_t))`."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.mix = rng.standard_normal((D_IN, LATENT)) / np.sqrt(LATENT) * 2.0
        self.generic = rng.standard_normal((CLASSES, D_IN))
        self.teachers = [0.3 * self.generic + rng.standard_normal((CLASSES, D_IN)) for _ in range(TASKS)]
        self.centres = [1.5 * rng.standard_normal(D_IN) for _ in range(TASKS)]

    def inputs(self, centre, n):
        z = self.rng.standard_normal((n, LATENT))
        return (centre + z @ self.mix.T + 0.05 * self.rng.standard_normal((n, D_IN))).astype(np.float32)

    def task(self, t, n):
        x = self.inputs(self.centres[t], n)
        return x, np.argmax((x - self.centres[t]) @ self.teachers[t].T, axis=1)

    def pretrain(self, n):
        c = self.rng.integers(0, TASKS + 1, n)
        centres = np.stack([np.zeros(D_IN)] + self.centres)
        x = (
            centres[c] + self.rng.standard_normal((n, LATENT)) @ self.mix.T + 0.05 * self.rng.standard_normal((n, D_IN))
        ).astype(np.float32)
        return x, np.argmax((x - centres[c]) @ self.generic.T, axis=1)


# --------------------------------------------------------------------------- training


def train(model: MLP, x: np.ndarray, y: np.ndarray, steps: int, lr: float, seed: int) -> MLP:
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return model


def accuracy(model: MLP, x, y) -> float:
    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == jnp.asarray(y)))


def params_of(model: MLP) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def with_params(template: MLP, params: dict) -> MLP:
    graphdef, state = nnx.split(template)
    state = jax.tree_util.tree_map(lambda v: v, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="compare_merging_methods.png", help="PNG path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    data = Tasks(args.seed)

    base = train(MLP(nnx.Rngs(args.seed)), *data.pretrain(20000), steps=1500, lr=3e-3, seed=1)
    base_params = params_of(base)
    tests = [data.task(t, 2000) for t in range(TASKS)]
    fts = []
    for t in range(TASKS):
        ft = with_params(base, jax.tree_util.tree_map(jnp.array, base_params))
        fts.append(params_of(train(ft, *data.task(t, 8000), steps=600, lr=2e-3, seed=10 + t)))

    # Calibration: every linear layer's inputs on each task's data, under the base
    # model ("base", used by every method) and, for comparison, under fine-tuned
    # model t on task t ("per_task", RegMean's original recipe; rows marked "ft").
    calib = [data.task(t, 512)[0] for t in range(TASKS)]
    ft_models = [with_params(base, p) for p in fts]

    def layer_hessians(models):
        out = {}
        for layer in LAYERS:
            hs = []
            for t in range(TASKS):
                x = models[t].layer_inputs(jnp.asarray(calib[t]))[layer]
                state = hessian_update(hessian_init(x.shape[-1]), x[:, None, :])  # 512 sequences of 1 token
                hs.append(hessian_finalize(state))
            out[f"{layer}.kernel"] = jnp.stack(hs)  # [T, in, in]
        return out

    hessians = layer_hessians([base] * TASKS)
    hessians_ft = layer_hessians(ft_models)

    def evaluate(params):
        model = with_params(base, params)
        accs = [accuracy(model, *tests[t]) for t in range(TASKS)]
        errs = []
        for layer in LAYERS:
            w0 = np.asarray(base_params[layer]["kernel"], np.float64).T  # [out, in]
            wm = np.asarray(params[layer]["kernel"], np.float64).T
            for t in range(TASKS):
                wt = np.asarray(fts[t][layer]["kernel"], np.float64).T
                h = np.asarray(hessians[f"{layer}.kernel"][t], np.float64)
                e, d = wm - wt, wt - w0
                errs.append(np.sqrt(np.trace(e @ h @ e.T) / np.trace(d @ h @ d.T)))
        return accs, float(np.mean(errs))

    def kernel(trim, rest):
        return [{"filter": "kernel", "value": trim}, {"value": rest}]

    methods = {
        "TA": ("task_arithmetic", {}, False),
        "TIES": ("ties", {}, True),
        "DARE": ("dare_linear", {}, True),
        "TIES+SparseGPT": ("ties", {"trim": kernel("sparsegpt", "magnitude")}, True),
        "DARE+SparseGPT": ("dare_linear", {"trim": kernel("sparsegpt", "random")}, True),
        "Wanda-TIES": ("ties", {"trim": kernel("wanda", "magnitude")}, True),
        "RegMean": ("regmean", {"alpha": 0.9}, False),
        "TIES+SparseGPT ft": ("ties", {"trim": kernel("sparsegpt", "magnitude"), "hessians": hessians_ft}, True),
        "RegMean ft": ("regmean", {"alpha": 0.9, "hessians": hessians_ft}, False),
    }
    common = dict(weights=[1.0] * TASKS, layout="flax", seed=args.seed)

    rows = []
    header = (
        f"{'model / method':<18} {'density':>7} {'time s':>7} "
        + " ".join(f"{'task' + str(t):>6}" for t in range(TASKS))
        + f" {'mean':>6} {'recon':>6}"
    )
    print(header)
    print("-" * len(header))

    def show(label, dens, secs, accs, err):
        d = "-" if dens is None else f"{dens:.1f}"
        s = "-" if secs is None else f"{secs:.3f}"
        e = "-" if err is None else f"{err:.3f}"
        print(f"{label:<18} {d:>7} {s:>7} " + " ".join(f"{a:6.3f}" for a in accs) + f" {np.mean(accs):6.3f} {e:>6}")

    show("base", None, None, evaluate(base_params)[0], None)
    for t in range(TASKS):
        show(f"fine-tuned {t}", None, None, evaluate(fts[t])[0], None)
    for label, (name, kw, uses_density) in methods.items():
        kw = {"hessians": hessians, **kw}
        for dens in DENSITIES if uses_density else (None,):
            extra = {"densities": dens} if uses_density else {}
            M.merge(name, base_params, fts, **common, **kw, **extra)  # warm-up (compilation)
            t0 = time.perf_counter()
            merged = M.merge(name, base_params, fts, **common, **kw, **extra)
            jax.block_until_ready(merged)
            secs = time.perf_counter() - t0
            accs, err = evaluate(merged)
            rows.append((label, dens, secs, accs, err))
            show(label, dens, secs, accs, err)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label in methods:
        pts = [r for r in rows if r[0] == label]
        if pts[0][1] is None:
            ax1.axhline(np.mean(pts[0][3]), ls="--", label=label, color=f"C{list(methods).index(label)}")
            ax2.axhline(pts[0][4], ls="--", label=label, color=f"C{list(methods).index(label)}")
        else:
            xs = [r[1] for r in pts]
            ax1.plot(xs, [np.mean(r[3]) for r in pts], "o-", label=label)
            ax2.plot(xs, [r[4] for r in pts], "o-", label=label)
    ax1.set(xlabel="density", ylabel="mean test accuracy over the 3 tasks", title="merged model quality")
    ax2.set(
        xlabel="density", ylabel="||(W_merged - W_t) X_t|| / ||(W_t - W_0) X_t||", title="layer reconstruction error"
    )
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}; total runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
