"""The inverse-Hessian factor the OBS sweep runs on.

`U` is the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`) after SparseGPT's
two fixes to H: dead columns (`H_ii == 0`, an input that never fires) get
`H_ii = 1`, and `percdamp * mean(diag(H))` is added to the diagonal.
`U[i, i]^2` is `[H_F^-1]_ii` for the columns F not yet processed, which is what
makes the column sweep an exact Optimal-Brain-Surgeon sequence.

We get U from one Cholesky of the *reversed* H instead of the reference's
cholesky -> cholesky_inverse -> cholesky: with `P` the reversal permutation and
`P H P = L L^T`, `U = P L^-1 P` is upper triangular with `U^T U = H^-1`. Half
the work, and no second factorisation of an ill-conditioned inverse.

`jnp.linalg.cholesky` returns NaNs instead of raising (it cannot raise inside
jit), so the factor checks `isfinite` and retries inside XLA with the damping
multiplied by 10, up to `max_escalations` times. It never falls back to the
identity (that would silently be magnitude pruning); callers raise on `ok=False`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from sgtv_jax import _checks
from sgtv_jax.defaults import PERCDAMP

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Bool, Float

HIGHEST = jax.lax.Precision.HIGHEST

MAX_ESCALATIONS = 5


class InverseFactor(NamedTuple):
    """Result of `inverse_factor` (leading `[T]` axis when H was a stack).

    upper: `[cols, cols]` upper-triangular U with `U^T U = (H + damp I)^-1`.
    dead: `[cols]` bool, columns whose input never fired (their delta is zeroed).
    percdamp: scalar, the relative damping finally used (>= the one asked for).
    ok: scalar bool, False if H stayed indefinite after every escalation.
    """

    upper: Float[Array, "*tasks cols cols"]
    dead: Bool[Array, "*tasks cols"]
    percdamp: Float[Array, "*tasks"]
    ok: Bool[Array, "*tasks"]


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for low-precision inputs; float64 stays float64 (when x64 is on)."""
    return jnp.result_type(dtype, jnp.float32)


# Below this size the inverse Cholesky factor comes from LAPACK directly; above
# it, from the recursion in `upper_inverse_cholesky`, whose work is matmuls.
LEAF = 128


def upper_inverse_cholesky(h: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """Upper U with `U^T U = h^-1`, for symmetric positive definite `h` `[n, n]`.

    Recursive on 2x2 blocks, `h = [[A, B], [B^T, C]]`, trailing block first:
    `U22 = U(C)`, `N = U22 B^T`, `U11 = U(A - N^T N)`, `U12 = -U11 N^T U22`
    (`U^-1` is the "upper-lower" factor of h, `h = V V^T`). The same arithmetic
    as a Cholesky of the reversed h followed by a triangular inverse, but
    nearly all of it is matrix products, which XLA runs at full speed on every
    backend (jaxlib's CPU potrf / trsm were 5-10x slower here). U[i, :i] is
    exactly zero, which the sweep relies on. NaN (never an exception) when h is
    not positive definite.
    """
    n = h.shape[-1]
    if n <= LEAF:
        # P h P = L L^T with P the reversal  =>  U = P L^-1 P.
        lower = jax.lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)
        linv = solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
        return jnp.triu(linv[::-1, ::-1])
    n1 = n - max(LEAF, (n // 2) // LEAF * LEAF)
    a, b, c = h[:n1, :n1], h[:n1, n1:], h[n1:, n1:]
    u22 = upper_inverse_cholesky(c)
    m = jnp.matmul(u22, b.T, precision=HIGHEST)
    u11 = upper_inverse_cholesky(a - jnp.matmul(m.T, m, precision=HIGHEST))
    u12 = -jnp.matmul(jnp.matmul(u11, m.T, precision=HIGHEST), u22, precision=HIGHEST)
    bottom = jnp.concatenate([jnp.zeros((n - n1, n1), h.dtype), u22], axis=1)
    return jnp.concatenate([jnp.concatenate([u11, u12], axis=1), bottom], axis=0)


def fix_dead_columns(hessian: Float[Array, "cols cols"]) -> tuple[Float[Array, "cols cols"], Bool[Array, " cols"]]:
    """(H with `H_ii = 1` where `H_ii == 0`, the dead-column mask `[cols]`) in the compute dtype."""
    h = hessian.astype(compute_dtype(hessian.dtype))
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(h.shape[-1])
    return h.at[idx, idx].set(jnp.where(dead, 1.0, diag).astype(h.dtype)), dead


def damped(h: Float[Array, "cols cols"], percdamp: Float[Array, ""]) -> Float[Array, "cols cols"]:
    """`h + percdamp * mean(diag(h)) * I` for a dead-fixed `h` `[cols, cols]`."""
    idx = jnp.arange(h.shape[-1])
    return h.at[idx, idx].add(jnp.asarray(percdamp, h.dtype) * jnp.mean(jnp.diagonal(h)))


def damped_hessian(
    hessian: Float[Array, "*tasks cols cols"], percdamp: Float[Array, "*tasks"]
) -> Float[Array, "*tasks cols cols"]:
    """The matrix the sweep factors: dead columns fixed, then damped; `[cols, cols]` or `[T, cols, cols]`."""

    def one(h, p):
        return damped(fix_dead_columns(h)[0], p)

    return jax.vmap(one)(hessian, percdamp) if hessian.ndim == 3 else one(hessian, percdamp)


def _factor_one(
    hessian: Float[Array, "cols cols"], percdamp: float | Float[Array, ""], max_escalations: int
) -> InverseFactor:
    h, dead = fix_dead_columns(hessian)
    percdamp = jnp.asarray(percdamp, h.dtype)

    def attempt(p):
        u = upper_inverse_cholesky(damped(h, p))
        return u, jnp.all(jnp.isfinite(u))

    def cond(carry):
        tries, _, _, ok = carry
        return jnp.logical_and(~ok, tries < max_escalations)

    def body(carry):
        tries, p, _, _ = carry
        p = p * 10
        u, ok = attempt(p)
        return tries + 1, p, u, ok

    u, ok = attempt(percdamp)
    _, p, u, ok = jax.lax.while_loop(cond, body, (jnp.int32(0), percdamp, u, ok))
    return InverseFactor(u, dead, p, ok)


@functools.partial(jax.jit, static_argnames="max_escalations")
def factor_unchecked(
    hessian: Float[Array, "*tasks cols cols"],
    percdamp: float | Float[Array, ""] = PERCDAMP,
    max_escalations: int = MAX_ESCALATIONS,
) -> InverseFactor:
    """`inverse_factor` without the argument checks (callers have done them)."""
    if hessian.ndim == 3:
        return jax.vmap(_factor_one, in_axes=(0, None, None))(hessian, percdamp, max_escalations)
    return _factor_one(hessian, percdamp, max_escalations)


def inverse_factor(
    hessian: Float[Array, "*tasks cols cols"],
    percdamp: float | Float[Array, ""] = PERCDAMP,
    max_escalations: int = MAX_ESCALATIONS,
) -> InverseFactor:
    """Damped upper Cholesky factor of `H^-1`, for `[cols, cols]` or a stack `[T, cols, cols]`.

    Pure and jit-compiled (`percdamp` may be traced; `max_escalations` is
    static); check `ok` on the result (see module docstring). H must be
    symmetric to sqrt(eps) of its largest entry, and `percdamp` a finite number
    >= 0: with concrete arguments a violation raises `ValueError` naming them;
    under tracing it makes `ok` False (and is a checkify error).
    """
    hessian = _checks.as_array(hessian, "hessian")
    if hessian.ndim not in (2, 3) or hessian.shape[-1] != hessian.shape[-2]:
        raise ValueError(f"hessian must be [cols, cols] or [T, cols, cols], got shape {hessian.shape}")
    guard = _checks.Guard()
    _checks.check_percdamp(percdamp, guard)
    _checks.check_symmetric(hessian, "hessian", guard)
    factor = factor_unchecked(hessian, percdamp, max_escalations)
    return factor if guard.ok is None else factor._replace(ok=factor.ok & guard.ok)


@jax.jit
def factor_from_inverse(hessian_inv: Float[Array, "cols cols"]) -> InverseFactor:
    """Factor of a precomputed (already damped) inverse Hessian `[cols, cols]`.

    Returns the upper Cholesky factor of `hessian_inv` itself; no dead-column
    detection or damping is possible from an inverse, so `dead` is all False.
    """
    h = hessian_inv.astype(compute_dtype(hessian_inv.dtype))
    # cholesky(A)^T is the upper factor with U^T U = A.
    u = jnp.triu(jax.lax.linalg.cholesky(h, symmetrize_input=False).T)
    ok = jnp.all(jnp.isfinite(u))
    return InverseFactor(u, jnp.zeros(h.shape[-1], bool), jnp.zeros((), h.dtype), ok)
