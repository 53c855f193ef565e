"""`sgtv merge` under jax.distributed: two CPU processes on localhost (gloo) equal one process.

Both processes run the same command with --coordinator / --num-processes /
--process-id; process 0 alone writes OUT. Calibration is split over the two
processes' devices and its Hessians summed across them, so the output equals
the one-process merge within float32 rounding (the bound of
tests/test_pipeline_mesh.py: each task vector within 1e-4 of its largest
entry), not bit for bit: one process keeps a running mean, two sum two partials.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import test_pipeline_helpers as H
import yaml
from safetensors.numpy import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    paths = H.make_family(tmp_path, "llama")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(H.config_dict(paths, tmp_path)))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cli = [sys.executable, "-m", "sgtv_jax.cli", "merge", str(cfg)]
    one = subprocess.run(cli + [str(tmp_path / "one"), "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            cli
            + [str(tmp_path / "two"), "--quiet", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "merged into" in outs[0][0] and "process 1: merged with process 0" in outs[1][0]
    report = json.loads((tmp_path / "two" / "merge_report.json").read_text())
    assert report["mesh"]["processes"] == 2 and report["mesh"]["devices"] == 2
    # process 1 wrote nothing: the only entries are process 0's output (no partial directories)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".two", "two"))) == ["two"]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    base = load_file(str(paths["base"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        tol = 1e-4 * max(float(np.abs(a[k] - base[k]).max()), 1e-12)
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=tol, err_msg=k)
