"""Entry counts from densities, identical for Python floats and traced arrays.

Counts are computed on the host as Python does it: `round((1 - d) * rows * width)`
(OBS, per block) or `round(d * n)` (trims), in float64 with round-half-even.
A traced density (inside `jit` / `vmap` / `grad`) must give exactly the same
integer, or the pruned mask would depend on whether the call was compiled.
With x64 enabled the same float64 operations run in XLA. Without x64 there is
no float64 on the device, and float32 arithmetic rounds differently near the
.5 boundaries, so `exact_round` replays the float64 operations bit for bit in
integer arithmetic: the density's value becomes a big integer over a power of
two (12-bit limbs in int32), every float64 operation rounds it to 53
significant bits (half-even), and the final rounding is half-even at the
binary point. The result equals Python's for the float64 value of the traced
float32 density (`float(np.float32(d))`), which is what an eager call made with
that array computes. `exact_floor` is the same with `int()` (truncation, which is
the floor for these non-negative products) in place of `round()`: mergekit's count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Float, Int

_BITS = 12
_MASK = (1 << _BITS) - 1
# Below this a density is 0 for every count (|d * n| < 1/2 and 1 - d rounds to 1 in float64).
_TINY = 2.0**-60


def _carry(a: Int[Array, "*batch limbs"]) -> Int[Array, "*batch limbs"]:
    """Normalise limbs `[..., L]` to [0, 2^12), propagating carries (and borrows) upwards."""
    out, c = [], jnp.zeros(a.shape[:-1], a.dtype)
    for i in range(a.shape[-1]):
        x = a[..., i] + c
        out.append(x & _MASK)
        c = x >> _BITS  # arithmetic shift: a borrow (-1) propagates as -1
    return jnp.stack(out, axis=-1)


def _limb_index(n: int) -> Int[Array, " n"]:
    return jnp.arange(n, dtype=jnp.int32)


def _pow2(p: Int[Array, "*batch"], n: int) -> Int[Array, "*batch n"]:
    """2^p as limbs `[..., n]`."""
    p = p[..., None]
    return jnp.where(p // _BITS == _limb_index(n), jnp.left_shift(1, p % _BITS), 0).astype(jnp.int32)


def _mul_const(a: Int[Array, "*batch limbs"], c: int) -> Int[Array, "*batch limbs"]:
    """a * c for a static non-negative int c < 2^36 (each partial product < 2^24, sums < 2^26)."""
    out = jnp.zeros_like(a)
    for j in range(3):
        cj = (c >> (_BITS * j)) & _MASK
        if cj:
            shifted = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(j, 0)])[..., : a.shape[-1]]
            out = out + shifted * cj
    return _carry(out)


def _bitlen(a: Int[Array, "*batch limbs"]) -> Int[Array, "*batch"]:
    # a limb (< 2^12) is exact in float32: its bit length is the float's exponent + 1
    per_limb = ((jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32) >> 23) - 126) * (a != 0)
    return jnp.max(jnp.where(a != 0, _BITS * _limb_index(a.shape[-1]) + per_limb, 0), axis=-1)


def _bit(a: Int[Array, "*batch limbs"], q: Int[Array, "*batch"]) -> Int[Array, "*batch"]:
    qs = jnp.clip(q, 0, None)
    limb = jnp.take_along_axis(a, (qs // _BITS)[..., None], axis=-1)[..., 0]
    return jnp.where(q >= 0, (limb >> (qs % _BITS)) & 1, 0)


def _low_mask(n: int, q: Int[Array, "*batch"]) -> Int[Array, "*batch n"]:
    """Per limb `[..., n]`, the mask of the bits below position q of the whole number."""
    return jnp.left_shift(1, jnp.clip(q[..., None] - _BITS * _limb_index(n), 0, _BITS)) - 1


def _round_at(a: Int[Array, "*batch limbs"], p: Int[Array, "*batch"]) -> Int[Array, "*batch limbs"]:
    """Round to a multiple of 2^p, half to even (p <= 0: unchanged)."""
    n = a.shape[-1]
    half = _bit(a, p - 1)
    sticky = jnp.any((a & _low_mask(n, p - 1)) != 0, axis=-1)
    odd = _bit(a, p)
    up = ((p > 0) & (half == 1) & (sticky | (odd == 1))).astype(jnp.int32)
    cleared = jnp.where((p > 0)[..., None], a & ~_low_mask(n, p), a)
    return _carry(cleared + up[..., None] * _pow2(jnp.maximum(p, 0), n))


def _floor_at(a: Int[Array, "*batch limbs"], p: Int[Array, "*batch"]) -> Int[Array, "*batch limbs"]:
    """Round down to a multiple of 2^p (p <= 0: unchanged)."""
    return jnp.where((p > 0)[..., None], a & ~_low_mask(a.shape[-1], p), a)


def _round53(a: Int[Array, "*batch limbs"]) -> Int[Array, "*batch limbs"]:
    """The float64 rounding of an integer: keep 53 significant bits, half to even."""
    return _round_at(a, jnp.maximum(_bitlen(a) - 53, 0))


def _shift_down(a: Int[Array, "*batch limbs"], s: Int[Array, "*batch"]) -> Int[Array, "*batch"]:
    """a / 2^s for a multiple of 2^s that fits in int32."""
    sh = _BITS * _limb_index(a.shape[-1]) - s[..., None]
    parts = jnp.where(sh >= 0, jnp.left_shift(a, jnp.clip(sh, 0, 30)), a >> jnp.clip(-sh, 0, 31))
    return jnp.sum(parts, axis=-1)


def _emulated(
    v: Float[Array, "*shape"], factors: tuple[int, ...], complement: bool, floor: bool = False
) -> Int[Array, "*shape"]:
    bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
    expo = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    tiny = v < _TINY
    # v = mant / 2^scale exactly (float32: 24-bit mantissa, scale <= 83 once tiny values are 0)
    mant = jnp.where(tiny, 0, jnp.where(expo == 0, frac, frac | 0x800000))
    scale = jnp.where(tiny, 0, jnp.where(expo == 0, 149, 150 - expo))
    nlimbs = -(-(84 + 2 + sum(int(f).bit_length() for f in factors)) // _BITS)
    a = jnp.stack([mant & _MASK, (mant >> _BITS) & _MASK], axis=-1)
    a = jnp.pad(a, [(0, 0)] * mant.ndim + [(0, nlimbs - 2)])
    if complement:  # float64 1 - v
        a = _round53(_carry(_pow2(scale, nlimbs) - a))
    for f in factors:  # float64 (... * f), left to right as Python evaluates it
        a = _round53(_mul_const(a, int(f)))
    return _shift_down(_floor_at(a, scale) if floor else _round_at(a, scale), scale)


def exact_round(
    value: Float[ArrayLike, "*shape"], factors: tuple[int, ...], *, complement: bool = False
) -> Int[Array, "*shape"]:
    """int32 `round((1 - value) * f1 * f2 ...)` (complement) or `round(value * f1 ...)`, as Python's float64.

    `value`: any shape, floating, in [0, 1] (NaN and values outside are clipped
    into [0, 1] here; callers check the range). `factors`: static non-negative
    ints below 2^36 whose product is below 2^31.
    """
    return _exact(value, factors, complement, floor=False)


def exact_floor(
    value: Float[ArrayLike, "*shape"], factors: tuple[int, ...], *, complement: bool = False
) -> Int[Array, "*shape"]:
    """int32 `int(value * f1 * f2 ...)` (or of `(1 - value) * ...`), as Python's float64; see `exact_round`."""
    return _exact(value, factors, complement, floor=True)


def _exact(
    value: Float[ArrayLike, "*shape"], factors: tuple[int, ...], complement: bool, floor: bool
) -> Int[Array, "*shape"]:
    v = jnp.asarray(value)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(jnp.float32)
    v = jnp.clip(jnp.where(jnp.isnan(v), 0, v), 0, 1)
    if jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # config options are dynamic attributes
        x = 1.0 - v.astype(jnp.float64) if complement else v.astype(jnp.float64)
        for f in factors:
            x = x * float(f)
        return (jnp.floor(x) if floor else jnp.round(x)).astype(jnp.int32)
    if v.dtype != jnp.float32:
        v = v.astype(jnp.float32)  # bf16 / f16 widen exactly
    return _emulated(v, tuple(int(f) for f in factors), complement, floor)
