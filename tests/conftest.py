"""Suite-wide hygiene: each test module's compiled XLA programs are released when it ends.

The whole suite compiles thousands of programs in one process; each compiled CPU
executable keeps memory mappings, and together they approach the kernel's
per-process limit (`vm.max_map_count`, 65530 here), past which XLA's compiler
crashes (a segfault late in the suite). Modules do not share compiled programs
worth keeping, so dropping them between modules costs only recompilation.
"""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
