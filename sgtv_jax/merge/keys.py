"""Per-tensor PRNG keys: reproducible from one seed, independent of visiting order.

`tensor_key(seed, name)` folds a stable 31-bit hash of the tensor's name
(`zlib.crc32`, not Python's salted `hash`) into the seed's key, so every tensor
gets its own stream whatever order a merge visits tensors in, and the same seed
gives bit-identical masks in every process. Task `t`'s key is
`task_keys(key, T)[t] = fold_in(key, t)`.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np


def name_hash(name: str) -> int:
    """Stable 31-bit hash of a tensor name (crc32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def root_key(seed: int | jax.Array) -> jax.Array:
    """A PRNG key from an int seed, or the key itself when one is given."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.PRNGKey(int(seed))
    return seed


def tensor_key(seed: int | jax.Array, name: str) -> jax.Array:
    """The key for tensor `name`: `fold_in(root_key(seed), name_hash(name))`."""
    return jax.random.fold_in(root_key(seed), name_hash(name))


def task_keys(key: jax.Array, tasks: int) -> list[jax.Array]:
    """One independent key per task vector of a stack: `fold_in(key, t)`."""
    return [jax.random.fold_in(key, t) for t in range(tasks)]
