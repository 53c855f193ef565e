"""Rows sharded over 8 simulated devices give the single-device result.

Runs in a subprocess: the device count is fixed when JAX initialises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sgtv_jax import hessian_init, hessian_update, obs_prune
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32, 96)).astype(np.float32) @ rng.standard_normal((96, 96)).astype(np.float32)
    d = rng.standard_normal((3, 64, 96)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    # Hessian: data-parallel over sequences, XLA all-reduces.
    h1 = hessian_update(hessian_init(96), x).hessian
    xs = jax.device_put(x, NamedSharding(mesh, P("x", None, None)))
    h8 = hessian_update(hessian_init(96), xs).hessian
    # Summation order differs (per-device partial sums), so compare at the
    # matrix's scale: float32 rounding relative to max |H|.
    scale = float(jnp.max(jnp.abs(h1)))
    np.testing.assert_allclose(np.asarray(h8), np.asarray(h1), rtol=0, atol=1e-6 * scale)
    # OBS: rows sharded, H replicated.
    hr = jax.device_put(h1, NamedSharding(mesh, P()))
    for kw in (dict(density=0.3, blocksize=32), dict(prunen=2, prunem=4, blocksize=32)):
        p1, l1 = obs_prune(d, h1, **kw)
        ds = jax.device_put(d, NamedSharding(mesh, P(None, "x", None)))
        p8, l8 = obs_prune(ds, hr, **kw)
        assert len(p8.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(p8) == 0, np.asarray(p1) == 0)
        np.testing.assert_allclose(np.asarray(p8), np.asarray(p1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(l8), np.asarray(l1), rtol=1e-5)
    print("SHARDED-OK")
    """
)


def test_rows_sharded_over_eight_devices_equal_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHARDED-OK" in proc.stdout
