"""Whole-model merges: pytrees, per-model / per-tensor parameters, determinism, errors, seed API."""

import numpy as np
import pytest

import sgtv_jax.merge as M


def make_models(seed=0, tasks=3):
    rng = np.random.default_rng(seed)
    base = {
        "layers.0.mlp.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "layers.0.mlp.bias": rng.standard_normal((6,)).astype(np.float32),
        "layers.0.attn.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "step": np.array(3, np.int32),
    }
    models = []
    for _ in range(tasks):
        m = {
            k: (v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) if v.dtype != np.int32 else v)
            for k, v in base.items()
        }
        models.append(m)
    return base, models


def deltas(base, models, name):
    return np.stack([m[name] - base[name] for m in models])


def test_task_arithmetic_single_model_weight_one_gives_finetuned():
    base, models = make_models(tasks=1)
    out = M.merge("task_arithmetic", base, models, weights=[1.0])
    for k in base:
        np.testing.assert_allclose(np.asarray(out[k]), models[0][k], rtol=0, atol=1e-6)
        assert out[k].dtype == base[k].dtype


def test_model_merge_matches_tensor_merge_and_copies_non_float():
    base, models = make_models()
    out = M.merge("ties", base, models, weights=[1, 0.5, 2], densities=[0.5, 0.3, 0.7])
    for k in ("layers.0.mlp.weight", "layers.0.mlp.bias", "layers.0.attn.weight"):
        expected = base[k] + np.asarray(M.ties(deltas(base, models, k), [1, 0.5, 2], [0.5, 0.3, 0.7]))
        np.testing.assert_allclose(np.asarray(out[k]), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["step"]), base["step"])


def test_per_tensor_parameters_filter_rules_and_callables():
    base, models = make_models()
    dens = [[{"filter": "mlp", "value": 0.2}, {"value": 1.0}], 0.5, lambda n: 0.9 if "bias" in n else 0.4]
    out = M.merge(
        "ties",
        base,
        models,
        weights=[1, 1, 1],
        densities=dens,
        **{"lambda": [{"filter": "attn", "value": 0.5}, {"value": 1.0}]},
    )
    k = "layers.0.attn.weight"
    exp = base[k] + np.asarray(M.ties(deltas(base, models, k), [1, 1, 1], [1.0, 0.5, 0.4], lambda_=0.5))
    np.testing.assert_allclose(np.asarray(out[k]), exp, rtol=1e-6, atol=1e-6)
    k = "layers.0.mlp.bias"
    exp = base[k] + np.asarray(M.ties(deltas(base, models, k), [1, 1, 1], [0.2, 0.5, 0.9]))
    np.testing.assert_allclose(np.asarray(out[k]), exp, rtol=1e-6, atol=1e-6)


def test_nested_pytree_and_flax_layout():
    rng = np.random.default_rng(1)
    kern = rng.standard_normal((8, 6)).astype(np.float32)  # flax [in, out]
    base = {"dense": {"kernel": kern, "bias": np.zeros(6, np.float32)}}
    models = [
        {"dense": {"kernel": kern + rng.standard_normal((8, 6)).astype(np.float32), "bias": np.ones(6, np.float32) * t}}
        for t in range(2)
    ]
    x = rng.standard_normal((8, 30))
    h = (2 * x @ x.T / 30).astype(np.float32)
    out = M.merge(
        "ties",
        base,
        models,
        densities=0.5,
        layout="flax",
        hessians={"dense.kernel": h},
        trim=[{"filter": "kernel", "value": "sparsegpt"}, {"value": "magnitude"}],
    )
    d = np.stack([m["dense"]["kernel"] - kern for m in models]).transpose(0, 2, 1)  # [T, out, in]
    exp = kern + np.asarray(M.ties(d, [1, 1], 0.5, trim="sparsegpt", calib=M.Calibration(hessian=h))).T
    np.testing.assert_allclose(np.asarray(out["dense"]["kernel"]), exp, rtol=1e-5, atol=1e-5)
    assert set(out) == {"dense"} and set(out["dense"]) == {"kernel", "bias"}


def test_regmean_model_with_grams_and_layout():
    rng = np.random.default_rng(2)
    base, models = make_models(3)
    xs = [rng.standard_normal((8, 50)) for _ in range(3)]
    grams = np.stack([2 * x @ x.T / 50 for x in xs]).astype(np.float32)
    out = M.merge("regmean", base, models, hessians={"layers.0.mlp.weight": grams}, alpha=0.8)
    k = "layers.0.mlp.weight"
    exp = base[k] + np.asarray(M.regmean(deltas(base, models, k), grams=grams, alpha=0.8))
    np.testing.assert_allclose(np.asarray(out[k]), exp, rtol=1e-5, atol=1e-5)
    k = "layers.0.attn.weight"  # no Gram -> mean
    np.testing.assert_allclose(np.asarray(out[k]), np.mean([m[k] for m in models], 0), rtol=1e-5, atol=1e-5)


def test_regmean_model_no_gram_sum_adds_the_task_vectors_of_gramless_tensors():
    rng = np.random.default_rng(3)
    base, models = make_models(3)
    x = rng.standard_normal((8, 50))
    grams = np.stack([2 * x @ x.T / 50] * 3).astype(np.float32)
    k = "layers.0.mlp.weight"
    plain = M.merge("regmean", base, models, hessians={k: grams})
    out = M.merge("regmean", base, models, hessians={k: grams}, no_gram="sum")
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(plain[k]))  # the fit is unchanged
    g = "layers.0.attn.weight"  # no Gram -> base + the sum of the task vectors
    exp = base[g].astype(np.float64) + sum(m[g].astype(np.float64) - base[g] for m in models)
    np.testing.assert_allclose(np.asarray(out[g]), exp, rtol=1e-5, atol=1e-5)


def test_seed_bit_identical_and_order_independent():
    base, models = make_models()
    kw = dict(weights=[1, 1, 1], densities=[0.3, 0.5, 0.7])
    a = M.merge("dare_ties", base, models, seed=7, **kw)
    b = M.merge("dare_ties", base, models, seed=7, **kw)

    def rev(d):
        return dict(reversed(list(d.items())))

    c = M.merge("dare_ties", rev(base), [rev(m) for m in models], seed=7, **kw)
    only = {k: base[k] for k in ["layers.0.attn.weight"]}
    d = M.merge("dare_ties", only, [{k: m[k] for k in only} for m in models], seed=7, **kw)
    e = M.merge("dare_ties", base, models, seed=8, **kw)
    for k in base:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(c[k]))
    np.testing.assert_array_equal(np.asarray(a["layers.0.attn.weight"]), np.asarray(d["layers.0.attn.weight"]))
    assert not np.array_equal(np.asarray(a["layers.0.attn.weight"]), np.asarray(e["layers.0.attn.weight"]))
    # tensors of equal shape still get independent masks
    assert not np.array_equal(
        np.asarray(a["layers.0.mlp.weight"] != base["layers.0.mlp.weight"])[:, :6],
        np.asarray(a["layers.0.attn.weight"] != base["layers.0.attn.weight"])[:6, :6],
    )


# ----------------------------------------------------------------- errors


def test_missing_and_mismatched_tensors_are_listed():
    base, models = make_models()
    del models[1]["layers.0.mlp.bias"]
    del models[1]["layers.0.mlp.weight"]
    models[2]["layers.0.attn.weight"] = np.zeros((8, 7), np.float32)
    models[0]["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        M.merge("ties", base, models)
    msg = str(e.value)
    assert "model 1 is missing tensors ['layers.0.mlp.bias', 'layers.0.mlp.weight']" in msg
    assert "model 2 has tensors of different shapes: 'layers.0.attn.weight' (8, 7) vs base (8, 8)" in msg
    assert "model 0 has tensors the base model lacks: ['extra']" in msg


def test_parameter_errors():
    base, models = make_models()
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 fine-tuned models"):
        M.merge("ties", base, models, weights=[1, 1])
    with pytest.raises(ValueError, match="densities has 4 entries but there are 3 fine-tuned models"):
        M.merge("ties", base, models, densities=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"densities\[2\] must be in \[0, 1\], got 2.0 for tensor"):
        M.merge("ties", base, models, densities=[1, 1, 2.0])
    with pytest.raises(ValueError, match="method 'ties' has no parameter\\(s\\) \\['alpha'\\]"):
        M.merge("ties", base, models, alpha=0.5)
    with pytest.raises(
        ValueError, match="unknown merge method 'frankenmerge'; known methods: linear, task_arithmetic, ties"
    ):
        M.merge("frankenmerge", base, models)
    with pytest.raises(ValueError, match="no filter rule matches tensor"):
        M.merge("ties", base, models, densities=[[{"filter": "mlp", "value": 0.5}]] * 3)


def test_nan_in_model_is_named():
    base, models = make_models()
    models[2]["layers.0.mlp.weight"][1, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in model 2 tensor 'layers.0.mlp.weight' \(1 entries\)"):
        M.merge("task_arithmetic", base, models)


def test_missing_calibration_lists_tensors_before_any_work():
    base, models = make_models()
    h = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError) as e:
        M.merge(
            "ties",
            base,
            models,
            densities=0.5,
            trim=[{"filter": "weight", "value": "sparsegpt"}, {"value": "magnitude"}],
            hessians={"layers.0.attn.weight": h},
        )
    assert "1 tensor(s) have no calibration statistics for trim sparsegpt: ['layers.0.mlp.weight']" in str(e.value)
    with pytest.raises(ValueError, match="needs 2-D linear weights, but tensor 'layers.0.mlp.bias'"):
        M.merge("ties", base, models, densities=0.5, trim="wanda", hessians={"layers.0.attn.weight": h})
    with pytest.raises(ValueError, match=r"hessians\['layers.0.mlp.weight'\] has shape \(6, 6\)"):
        M.merge("ties", base, models, densities=0.5, trim="sparsegpt", hessians={"layers.0.mlp.weight": np.eye(6)})


# ----------------------------------------------------------------- the PyTorch original's API


def test_seed_ties_on_one_tensor_and_on_a_model():
    base, models = make_models()
    k = "layers.0.attn.weight"
    got = M.TIES().merge([1, 1, 1], base[k], [m[k] for m in models], [0.5, 0.5, 0.5])
    exp = base[k] + np.asarray(M.ties(deltas(base, models, k), [1, 1, 1], 0.5))
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-6, atol=1e-6)
    full = M.TIES().merge([1, 1, 1], base, models, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(np.asarray(full[k]), exp, rtol=1e-6, atol=1e-6)


def test_seed_sparsegpt_with_inverse_or_plain_hessians():
    base, models = make_models(4)
    k = "layers.0.attn.weight"
    rng = np.random.default_rng(5)
    hs = [(lambda x: 2 * x @ x.T / 40)(rng.standard_normal((8, 40))) for _ in range(3)]
    damped = [h + 0.01 * np.mean(np.diag(h)) * np.eye(8) for h in hs]
    invs = [np.linalg.inv(h).astype(np.float32) for h in damped]
    tv = [m[k] for m in models]
    a = M.TIES().merge([1, 1, 1], base[k], tv, [0.3] * 3, hessian_invs=invs, use_sparsegpt=True, blocksize=4)
    b = M.TIES().merge(
        [1, 1, 1], base[k], tv, [0.3] * 3, hessians=[h.astype(np.float32) for h in hs], use_sparsegpt=True, blocksize=4
    )
    exp = base[k] + np.asarray(
        M.ties(
            deltas(base, models, k),
            [1, 1, 1],
            0.3,
            trim="sparsegpt",
            calib=M.Calibration(hessian=np.stack(hs).astype(np.float32)),
            blocksize=4,
        )
    )
    np.testing.assert_allclose(np.asarray(b), exp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
    # the PyTorch original's get_inverse_hessian returned the upper Cholesky factor of H^-1: same result
    ups = [np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32) for h in damped]
    c = M.TIES().merge([1, 1, 1], base[k], tv, [0.3] * 3, hessian_invs=ups, use_sparsegpt=True, blocksize=4)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-3, atol=1e-4)
    # a model: tensors with statistics use OBS, the others the data-free trim
    full = M.TIES().merge([1, 1, 1], base, models, [0.3] * 3, hessian_invs={k: invs}, use_sparsegpt=True, blocksize=4)
    np.testing.assert_allclose(np.asarray(full[k]), np.asarray(a), rtol=1e-6, atol=1e-6)
    kb = "layers.0.mlp.bias"
    np.testing.assert_allclose(
        np.asarray(full[kb]),
        base[kb] + np.asarray(M.ties(deltas(base, models, kb), [1, 1, 1], 0.3)),
        rtol=1e-6,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="hessian_invs \\(full inverse Hessians\\) or hessians is required"):
        M.TIES().merge([1, 1, 1], base[k], tv, [0.3] * 3, use_sparsegpt=True)
    with pytest.raises(ValueError, match="not both"):
        M.TIES().merge([1, 1, 1], base[k], tv, [0.3] * 3, hessians=hs, hessian_invs=invs, use_sparsegpt=True)


def test_seed_dare_seeded_and_rescale_default():
    base, models = make_models(6)
    k = "layers.0.mlp.weight"
    tv = [m[k] for m in models]
    a = M.DARE().merge([1, 1, 1], base[k], tv, [0.4] * 3, seed=3)
    b = M.DARE().merge([1, 1, 1], base[k], tv, [0.4] * 3, seed=3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exp = base[k] + np.asarray(
        M.dare_linear(deltas(base, models, k), [1, 1, 1], 0.4, key=M.keys.tensor_key(3, "tensor"))
    )
    np.testing.assert_allclose(np.asarray(a), exp, rtol=1e-6, atol=1e-6)
    h = np.eye(8, dtype=np.float32)
    obs = M.DARE().merge([1, 1, 1], base[k], tv, [0.4] * 3, hessians=[h] * 3, use_sparsegpt=True, blocksize=4)
    obs_r = M.DARE().merge(
        [1, 1, 1], base[k], tv, [0.4] * 3, hessians=[h] * 3, use_sparsegpt=True, blocksize=4, rescale=True
    )
    np.testing.assert_allclose(np.asarray(obs_r) - base[k], (np.asarray(obs) - base[k]) / 0.4, rtol=1e-5, atol=1e-6)


def test_regmean_flax_layout_is_transposed_torch_layout():
    base, models = make_models(7)
    k = "layers.0.mlp.weight"  # [6, 8]: as a flax kernel, in = 6
    rng = np.random.default_rng(8)
    grams = np.stack([(lambda x: 2 * x @ x.T / 40)(rng.standard_normal((6, 40))) for _ in range(3)]).astype(np.float32)
    flax = M.merge("regmean", {k: base[k]}, [{k: m[k]} for m in models], hessians={k: grams}, layout="flax")
    torch = M.merge("regmean", {k: base[k].T}, [{k: m[k].T} for m in models], hessians={k: grams})
    np.testing.assert_allclose(np.asarray(flax[k]), np.asarray(torch[k]).T, rtol=1e-5, atol=1e-5)


def test_linear_model_level():
    base, models = make_models(9)
    k = "layers.0.attn.weight"
    out = M.merge("linear", base, models, weights=[1, 2, 1])
    np.testing.assert_allclose(
        np.asarray(out[k]), (models[0][k] + 2 * models[1][k] + models[2][k]) / 4, rtol=1e-5, atol=1e-5
    )
    out = M.merge("linear", base, models, weights=[0.5, 0.5, 0.5], normalize=False)
    np.testing.assert_allclose(np.asarray(out[k]), 0.5 * sum(m[k] for m in models), rtol=1e-5, atol=1e-5)


def test_della_epsilon_checked_up_front():
    base, models = make_models()
    with pytest.raises(ValueError, match="model 0 has density 0.1, epsilon 0.15"):
        M.merge("della", base, models, densities=[0.1, 0.5, 0.5])
    out = M.merge("della", base, models, densities=[0.3, 0.5, 0.5], epsilon=0.05, seed=1)
    k = "layers.0.attn.weight"
    exp = base[k] + np.asarray(
        M.della(deltas(base, models, k), [1, 1, 1], [0.3, 0.5, 0.5], epsilon=0.05, key=M.keys.tensor_key(1, k))
    )
    np.testing.assert_allclose(np.asarray(out[k]), exp, rtol=1e-6, atol=1e-6)
