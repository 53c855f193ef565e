"""The numeric core and the merge methods inside JAX transforms: jit, vmap, grad, 8 devices.

Every compiled / vectorised / differentiated / sharded result is compared with
the eager call on the same values (the eager functions are tested against
independent oracles in the other test files). Shapes are tiny: the cost is
compilation.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import sgtv_jax as sg
from sgtv_jax import counts
from sgtv_jax.merge import (
    Calibration,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    magnitude_linear,
    regmean,
    task_arithmetic,
    ties,
)
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.batch import merge_grid

ROWS, COLS, T, BS = 8, 16, 3, 8
KEY = jax.random.PRNGKey(7)


def _data(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, COLS)) @ rng.standard_normal((COLS, COLS))
    h = (x.T @ x / 32).astype(dtype)
    stack = rng.standard_normal((T, ROWS, COLS)).astype(dtype)
    return jnp.asarray(stack), jnp.asarray(h)


STACK, H = _data()
CALIB = Calibration(hessian=H)


def same(a, b, exact=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if exact:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_array_equal(a == 0, b == 0)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- exact counts


def _host(v, factors, complement):
    x = (1.0 - float(v)) if complement else float(v)
    for f in factors:
        x = x * f
    return round(x)


def _round_both(v, factors):
    return counts.exact_round(v, factors, complement=True), counts.exact_round(v, factors)


def test_traced_counts_equal_host_float64_at_half_boundaries():
    rng = np.random.default_rng(0)
    for factors in [(7, 3), (999999, 1000)]:
        n = int(np.prod(factors))
        vals = [np.float32(v) for v in rng.random(50)]
        for j in rng.integers(0, n, 60):
            for c in (1 - (j + 0.5) / n, (j + 0.5) / n):  # the .5 boundaries of both forms
                f = np.float32(c)
                up, down = np.nextafter(f, np.float32(2)), np.nextafter(f, np.float32(-1))
                vals += [f, up, down, np.nextafter(up, np.float32(2))]
        vals += [np.float32(v) for v in (0, 1, 0.5, 0.25, 0.15, 0.1, 2**-30, 2**-61, 1e-45)]
        vals = np.clip(np.array(vals, np.float32), 0, 1)
        both = jax.jit(_round_both, static_argnums=1)(vals, factors)
        for complement, got in zip((True, False), both):
            want = np.array([_host(v, factors, complement) for v in vals])
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{factors} {complement}")
            # float32 arithmetic alone gets these boundaries wrong: the test can fail
            naive = np.round(((np.float32(1) - vals) if complement else vals) * np.float32(n))
            if n > 1000:
                assert np.any(naive != want)


def test_traced_counts_with_x64_equal_host():
    vals = np.array([0.15, 0.35, 0.85, 1 - 2.5 / 10, 0.3], np.float64)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(lambda v: counts.exact_round(v, (10,), complement=True))(jnp.asarray(vals)))
    np.testing.assert_array_equal(got, [_host(v, (10,), True) for v in vals])


# compiled once, shared by the tests below
OBS_TRACED = jax.jit(lambda s, h, r: sg.obs_prune(s, h, density=r, blocksize=BS)[0])


def test_obs_traced_density_prunes_the_host_count_at_a_half_boundary():
    # rows * width = 8 * 8 = 64; (1 - d) * 64 = 12.5 exactly -> round half even = 12
    d = np.float32(1 - 12.5 / 64)
    eager, _ = sg.obs_prune(STACK, H, density=float(d), blocksize=BS)
    traced = OBS_TRACED(STACK, H, d)
    same(traced, eager)
    np.testing.assert_array_equal(np.sum(np.asarray(eager)[..., :BS] == 0, axis=(1, 2)), [12] * T)


# --------------------------------------------------------------------------- one case per core call and transform


def test_table_obs_prune_jit_with_constant_density():
    eager, _ = sg.obs_prune(STACK, H, density=0.2, blocksize=BS)
    same(jax.jit(lambda d, h: sg.obs_prune(d, h, density=0.2, blocksize=BS)[0])(STACK, H), eager, exact=False)


def test_table_obs_prune_jit_with_traced_density():
    for r in (0.2, 0.0, 1.0):
        same(OBS_TRACED(STACK, H, r), sg.obs_prune(STACK, H, density=r, blocksize=BS)[0], exact=False)


def test_table_obs_prune_vmap_over_deltas():
    out = jax.vmap(lambda d: sg.obs_prune(d, H, density=0.2, blocksize=BS)[0])(STACK)
    same(out, sg.obs_prune(STACK, H, density=0.2, blocksize=BS)[0], exact=False)


def test_table_obs_prune_grad_eager():
    # For a fixed mask the sweep is linear in delta, so f(delta) = <grad f, delta>.
    c = jnp.asarray(np.random.default_rng(1).standard_normal(STACK.shape), jnp.float32)

    def f(d):
        return jnp.sum(c * sg.obs_prune(d, H, density=0.5, blocksize=BS)[0])

    g = jax.grad(f)(STACK)
    assert float(jnp.max(jnp.abs(g))) > 0
    np.testing.assert_allclose(float(jnp.sum(g * STACK)), float(f(STACK)), rtol=1e-4)


def test_table_hessian_update_jit_and_scan():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 2, 5, COLS)), jnp.float32)
    state = sg.hessian_init(COLS)
    for b in x:
        state = sg.hessian_update(state, b)
    eager = sg.hessian_finalize(state)

    def step(s, b):
        return sg.hessian_update(s, b), None

    scanned, _ = jax.jit(lambda x: jax.lax.scan(step, sg.hessian_init(COLS), x))(x)
    np.testing.assert_allclose(np.asarray(jax.jit(sg.hessian_finalize)(scanned)), np.asarray(eager), rtol=1e-6)


def test_table_ties_jit():
    same(
        jax.jit(lambda s: ties(s, weights=[1.0] * 3, densities=0.2))(STACK),
        ties(STACK, weights=[1.0] * 3, densities=0.2),
    )


def test_table_ties_sparsegpt_jit():

    def f(s, h):
        return ties(s, weights=[1.0] * 3, densities=0.3, trim="sparsegpt", calib=Calibration(hessian=h), blocksize=BS)

    same(jax.jit(f)(STACK, H), f(STACK, H))


def test_table_task_arithmetic_vmap():
    stacks = jnp.stack([STACK, 2 * STACK])
    out = jax.vmap(lambda s: task_arithmetic(s, weights=[1.0] * 3))(stacks)
    for i in range(2):
        same(out[i], task_arithmetic(stacks[i], weights=[1.0] * 3), exact=False)


# --------------------------------------------------------------------------- transform matrix

W = [0.7, 1.0, 1.3]
METHODS = {
    "linear": (linear, {}),
    "task_arithmetic": (task_arithmetic, dict(densities=0.4, trim="magnitude")),
    "ties": (ties, dict(densities=0.4)),
    "ties_sparsegpt": (ties, dict(densities=0.4, trim="sparsegpt", calib=CALIB, blocksize=BS)),
    "ties_wanda": (ties, dict(densities=0.4, trim="wanda", calib=CALIB)),
    "dare_linear": (dare_linear, dict(densities=0.4, key=KEY)),
    "dare_ties": (dare_ties, dict(densities=0.4, key=KEY)),
    "della": (della, dict(densities=0.4, epsilon=0.1, key=KEY)),
    "della_linear": (della_linear, dict(densities=0.4, epsilon=0.1, key=KEY)),
    "breadcrumbs": (breadcrumbs, dict(densities=0.4, gamma=0.1)),
    "breadcrumbs_ties": (breadcrumbs_ties, dict(densities=0.4, gamma=0.1)),
    "magnitude_linear": (magnitude_linear, dict(densities=0.4)),
    "regmean": (regmean, dict(grams=jnp.stack([H, 2 * H, H + jnp.eye(COLS)]))),
}


SETTINGS = dict(
    weights=jnp.asarray([W, [1.0, 0.5, 2.0]]), densities=jnp.asarray([0.25, 0.6]), lambda_=jnp.asarray([0.8, 1.0])
)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_jit_of_vmap_over_weights_densities_lambda(name):
    """One compiled program vectorised over two settings == two eager calls with Python floats."""
    fn, kw = METHODS[name]
    kw = {k: v for k, v in kw.items() if k != "densities"}
    axes = {k: v for k, v in SETTINGS.items() if k == "weights" or k in inspect.signature(fn).parameters}
    grid = jax.jit(jax.vmap(lambda a: fn(STACK, **a, **kw)))(axes)
    for i in range(2):
        plain = {k: ([float(x) for x in v[i]] if v.ndim == 2 else float(v[i])) for k, v in axes.items()}
        # same kept entries; values to float32 rounding (XLA fuses multiply-adds differently from eager)
        same(grid[i], fn(STACK, **plain, **kw), exact=False)


@pytest.mark.parametrize("kind", trim_lib.TRIMS)
def test_trim_jit_of_vmap_over_densities(kind):
    kw = dict(key=KEY, calib=CALIB, blocksize=BS, gamma=0.1, epsilon=0.1)
    grid_d = (0.0, 0.4, 1.0)
    per_task = (0.3, 0.5, 0.7)
    f = jax.jit(
        lambda g, d: (jax.vmap(lambda x: trim_lib.trim(kind, STACK, x, **kw))(g), trim_lib.trim(kind, STACK, d, **kw))
    )
    grid, tasks = f(jnp.asarray(grid_d), jnp.asarray(per_task))
    for i, d in enumerate(grid_d):
        same(grid[i], trim_lib.trim(kind, STACK, d, **kw), exact=False)
    same(tasks, trim_lib.trim(kind, STACK, list(per_task), **kw), exact=False)


@pytest.mark.parametrize(
    "kw", [dict(density=0.35), dict(density=0.35, refit=True), dict(prunen=2, prunem=4)], ids=["dense", "refit", "2:4"]
)
def test_obs_prune_jit_vmap_percdamp(kw):
    dens = {"density": kw["density"]} if "density" in kw else {}
    kw_static = {k: v for k, v in kw.items() if k != "density"}
    damps = (0.01, 0.1)
    # jit with traced density and damping, vmapped over the damping: one program
    f = jax.jit(jax.vmap(lambda p, d: sg.obs_prune(STACK, H, blocksize=BS, percdamp=p, **d, **kw_static), (0, None)))
    out, loss = f(jnp.asarray(damps), dens)
    for i, p in enumerate(damps):
        eager, eloss = sg.obs_prune(STACK, H, blocksize=BS, percdamp=p, **kw)
        same(out[i], eager, exact=False)
        np.testing.assert_allclose(np.asarray(loss[i]), np.asarray(eloss), rtol=1e-5)


def test_inverse_factor_jit_vmap():
    f = sg.inverse_factor(H, 0.01)
    fj = jax.jit(sg.inverse_factor)(H, 0.01)
    np.testing.assert_allclose(np.asarray(fj.upper), np.asarray(f.upper), rtol=1e-5, atol=1e-7)
    fv = jax.vmap(sg.inverse_factor, in_axes=(None, 0))(H, jnp.asarray([0.01, 0.1]))
    np.testing.assert_allclose(
        np.asarray(fv.upper[1]), np.asarray(sg.inverse_factor(H, 0.1).upper), rtol=1e-5, atol=1e-7
    )
    assert bool(jnp.all(fv.ok))


def test_merge_grid_equals_eager_calls():
    weights = np.array([[1.0, 1.0, 1.0], [0.5, 1.5, 1.0]], np.float32)
    dens, lams = [0.2, 0.55], [1.0, 0.6]
    kw = dict(trim="sparsegpt", calib=CALIB, blocksize=BS)
    grid = merge_grid("ties", STACK, weights, dens, lams, **kw)
    assert grid.shape == (2, 2, 2, ROWS, COLS)
    for i, d in enumerate(dens):
        for j in range(2):
            for k, lam in enumerate(lams):
                eager = ties(STACK, weights=list(weights[j]), densities=float(np.float32(d)), lambda_=lam, **kw)
                same(grid[i, j, k], eager)


def test_merge_grid_refuses_bad_settings_by_name():
    with pytest.raises(ValueError, match="densities"):
        merge_grid("ties", STACK, [W], [0.2, 1.5])
    with pytest.raises(ValueError, match="weights"):
        merge_grid("ties", STACK, [[1.0, 1.0]], [0.2])
    with pytest.raises(ValueError, match="lambdas"):
        merge_grid("ties", STACK, [W], [0.2], lambda_=0.5)
    with pytest.raises(ValueError, match="no parameter"):
        merge_grid("ties", STACK, [W], [0.2], alpha=0.5)
    with pytest.raises(ValueError, match="takes no calib"):  # linear neither trims nor reads Grams
        merge_grid("linear", STACK, [W], calib=CALIB)


# --------------------------------------------------------------------------- gradients


GRAD_METHODS = [n for n in METHODS]


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_merge_gradient_wrt_weights_and_lambda_matches_finite_differences(name):
    fn, kw = METHODS[name]
    with jax.enable_x64(True):
        stack, h = _data(3, np.float64)
        kw = dict(kw)
        if "calib" in kw:
            kw["calib"] = Calibration(hessian=h)
        if "grams" in kw:
            kw["grams"] = jnp.stack([h, 2 * h, h + jnp.eye(COLS)])
        c = jnp.asarray(np.random.default_rng(4).standard_normal((ROWS, COLS)))
        has_lambda = name not in ("linear", "regmean")

        def f(w, lam):
            out = fn(stack, weights=w, **({"lambda_": lam} if has_lambda else {}), **kw)
            return jnp.sum(c * out)

        w0, lam0 = jnp.asarray([0.7, 1.1, 1.4]), jnp.asarray(0.9)
        gw, gl = jax.grad(f, argnums=(0, 1))(w0, lam0)
        eps = 1e-6
        fd = [(f(w0.at[t].add(eps), lam0) - f(w0.at[t].add(-eps), lam0)) / (2 * eps) for t in range(T)]
        np.testing.assert_allclose(np.asarray(gw), np.asarray(fd), rtol=1e-6, atol=1e-8)
        assert float(jnp.max(jnp.abs(gw))) > 0
        if has_lambda:
            fdl = (f(w0, lam0 + eps) - f(w0, lam0 - eps)) / (2 * eps)
            np.testing.assert_allclose(float(gl), float(fdl), rtol=1e-6)
            np.testing.assert_allclose(float(gl), float(f(w0, 1.0)), rtol=1e-9)  # linear in lambda


# --------------------------------------------------------------------------- checks under tracing


def _checked(s, h, r, p, w):
    pruned = sg.obs_prune(s, h, density=r, blocksize=BS, percdamp=p)[0]
    return pruned, ties(s, weights=w, densities=r)


CHECKED = checkify.checkify(jax.jit(_checked), errors=checkify.user_checks)


def test_traced_value_checks_are_checkify_errors_and_nan_under_plain_jit():
    good = dict(s=STACK, h=H, r=0.3, p=0.01, w=jnp.asarray(W))
    err, _ = CHECKED(**good)
    assert err.get() is None
    cases = [
        (dict(r=1.5), "density must be in [0, 1]"),
        (dict(s=STACK.at[1, 2, 3].set(jnp.nan)), "delta (task vector) contains NaN or Inf"),
        (dict(h=H.at[0, 1].add(1.0)), "hessian is not symmetric"),
        (dict(h=-jnp.eye(COLS)), "not positive definite"),
        (dict(p=-1.0), "percdamp must be a finite number >= 0"),
        (dict(w=jnp.asarray([1.0, jnp.nan, 1.0])), "weights must be finite"),
    ]
    for bad, message in cases:
        err, (pruned, merged) = CHECKED(**{**good, **bad})
        assert err.get() is not None and message in err.get(), (bad, err.get())
        assert bool(jnp.all(jnp.isnan(pruned))) or bool(jnp.all(jnp.isnan(merged)))
    # without checkify the same program runs and the bad result is NaN, not a silent value
    assert bool(jnp.all(jnp.isnan(jax.jit(_checked)(**{**good, "r": 1.5})[0])))


def test_shape_errors_at_trace_time_keep_their_messages():
    with pytest.raises(ValueError, match=r"hessian must have shape \(16, 16\)"):
        jax.jit(lambda s, h: sg.obs_prune(s, h, density=0.2)[0])(STACK, H[:4, :4])
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 task vectors"):
        jax.jit(lambda s, w: ties(s, weights=w, densities=0.2))(STACK, [1.0, 2.0])


# --------------------------------------------------------------------------- API edges


def test_asymmetric_hessian_is_refused_naming_it():
    bad = H.at[2, 5].add(0.5 * float(jnp.max(jnp.abs(H))))
    with pytest.raises(ValueError, match="hessian is not symmetric"):
        sg.obs_prune(STACK, bad, density=0.5)
    with pytest.raises(ValueError, match="hessian is not symmetric"):
        sg.inverse_factor(bad)
    # rounding-level asymmetry (as from accumulated float32 sums) is accepted
    tiny = H.at[2, 5].add(1e-6 * float(jnp.max(jnp.abs(H))))
    sg.obs_prune(STACK, tiny, density=0.5)


@pytest.mark.parametrize("percdamp", [-0.1, float("nan"), float("inf")])
def test_bad_percdamp_is_named(percdamp):
    with pytest.raises(ValueError, match="percdamp must be a finite number >= 0"):
        sg.obs_prune(STACK, H, density=0.5, percdamp=percdamp)
    with pytest.raises(ValueError, match="percdamp"):
        sg.inverse_factor(H, percdamp)


def test_empty_delta_and_zero_models_are_refused_by_name():
    with pytest.raises(ValueError, match="delta has an empty dimension"):
        sg.obs_prune(jnp.zeros((4, 0)), jnp.zeros((0, 0)), density=0.5)
    with pytest.raises(ValueError, match="delta has an empty dimension"):
        sg.obs_prune(jnp.zeros((0, 4)), jnp.eye(4), density=0.5)
    with pytest.raises(ValueError, match="no task vectors to prune"):
        sg.obs_prune(jnp.zeros((0, 3, 4)), jnp.eye(4), density=0.5)
    for fn in (ties, linear, task_arithmetic, regmean):
        with pytest.raises(ValueError, match="no task vectors to merge.*models"):
            fn(jnp.zeros((0, 4, 4)), weights=[])


# --------------------------------------------------------------------------- 8 simulated devices

SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import sgtv_jax as sg
    from sgtv_jax.merge import Calibration, ties, regmean
    from sgtv_jax.merge import trim as trim_lib
    from sgtv_jax.merge.batch import merge_grid
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)) @ rng.standard_normal((16, 16))
    h = jnp.asarray((x.T @ x / 32).astype(np.float32))
    s = jnp.asarray(rng.standard_normal((3, 16, 16)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows = NamedSharding(mesh, P(None, "x", None))
    ss, hr = jax.device_put(s, rows), jax.device_put(h, NamedSharding(mesh, P()))
    w = jnp.asarray([0.7, 1.0, 1.3])
    def check(out, ref):
        out, ref = np.asarray(out), np.asarray(ref)
        np.testing.assert_array_equal(out == 0, ref == 0)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    d = jnp.asarray(0.3)  # traced density
    cases = {
        "obs_prune": lambda s, h, d: sg.obs_prune(s, h, density=d, blocksize=8)[0],
        "magnitude": lambda s, h, d: trim_lib.trim("magnitude", s, d),
        "regmean": lambda s, h, d: regmean(s, weights=w, grams=h),
    }
    for name, f in cases.items():
        check(jax.jit(f)(ss, hr, d), f(s, h, 0.3))
        print("ok", name)
    g = merge_grid("ties", ss, jnp.stack([w, w[::-1]]), [0.3, 0.6], trim="sparsegpt",
                   calib=Calibration(hessian=hr), blocksize=8)
    ref = ties(s, weights=list(np.asarray(w[::-1])), densities=float(np.float32(0.6)), trim="sparsegpt",
               calib=Calibration(hessian=h), blocksize=8)
    check(g[1, 1, 0], ref)
    print("SHARDED-TRANSFORMS-OK")
    """
)


def test_transforms_on_eight_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHARDED-TRANSFORMS-OK" in proc.stdout
