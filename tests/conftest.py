"""Suite-wide hygiene: each test module's compiled XLA programs are released when it ends.

The whole suite compiles thousands of programs in one process. Without this, the
one-process run segfaulted in XLA's compiler late in the suite (twice, at the
same test); with it, it passes. The cause is inferred, not proven: each compiled
CPU executable keeps memory mappings, and together they may reach the kernel's
per-process limit (`vm.max_map_count`, 65530 on our machines). Modules do not
share compiled programs worth keeping, so dropping them between modules costs
only recompilation.

The suite also keeps `sgtv`'s persistent compilation cache off
(`SGTV_XLA_CACHE=off`, inherited by the subprocesses it starts): a test must
not read programs an earlier run left on disk, nor write to the user's cache.
"""

from __future__ import annotations

import gc
import os

import jax
import pytest

os.environ["SGTV_XLA_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
