"""Suite-wide hygiene: each test module's compiled XLA programs are released when it ends.

The whole suite compiles thousands of programs in one process. Without this, the
one-process run segfaulted in XLA's compiler late in the suite (twice, at the
same test); with it, it passes. The cause is inferred, not proven: each compiled
CPU executable keeps memory mappings, and together they may reach the kernel's
per-process limit (`vm.max_map_count`, 65530 on our machines). Modules do not
share compiled programs worth keeping, so dropping them between modules costs
only recompilation.
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
