"""Quiet by default: a normal `sgtv merge` prints no notice the user cannot act on.

The user environment has no torch; transformers then logs "PyTorch was not
found ..." when imported (for the tokenizer). The merge runs in a subprocess
whose `torch` import fails (`sys.modules["torch"] = None`, which is what
transformers' availability check sees), so the notice is really emitted; `-v`
shows it, the default run does not. XLA's `slow_operation_alarm` (constant
folding of a closed-over array) must not appear either.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sgtv_jax.cli import TORCH_NOTICE
from tests.helpers import tiny_models as H

ROOT = Path(__file__).resolve().parents[2]
WITHOUT_TORCH = 'import sys; sys.modules["torch"] = None; from sgtv_jax.cli import main; sys.exit(main())'


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    paths = H.make_family(root, "llama")
    cfg = root / "m.yaml"
    cfg.write_text(yaml.safe_dump(H.config_dict(paths, root)))  # sparsegpt: the tokenizer loads transformers
    return cfg


def _sgtv(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)  # the notice must be emitted for the test to mean anything
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, timeout=300, env=env
    )


def test_merge_without_torch_prints_no_notice(config, tmp_path):
    res = _sgtv("merge", str(config), str(tmp_path / "out"), "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert TORCH_NOTICE not in res.stderr and "slow_operation_alarm" not in res.stderr, res.stderr
    # -q: no bar, no memory summary; and no XLA C++ log line (`E1207 12:00:00.0 ... file.cc:73] ...`)
    assert not [ln for ln in res.stderr.splitlines() if re.match(r"[EWF]\d{4} ", ln)], res.stderr
    assert "[transformers]" not in res.stderr, res.stderr


def test_verbose_lets_the_notice_through(config, tmp_path):
    """The same run with `-v`: the notice is there, so the quiet run above hid it (and only because of the filter)."""
    res = _sgtv("merge", str(config), str(tmp_path / "out"), "--quiet", "-v")
    assert res.returncode == 0, res.stderr
    assert TORCH_NOTICE in res.stderr, res.stderr
