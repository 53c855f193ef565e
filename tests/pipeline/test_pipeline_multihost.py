"""`sgtv merge` under jax.distributed: two CPU processes on localhost (gloo) equal one process.

Both processes run the same command with --coordinator / --num-processes /
--process-id; process 0 alone writes OUT. Calibration is split over the two
processes' devices (`batch_size` windows each per step) and the chunk Grams
summed in window order, so the output equals the one-process merge bit for
bit (as in tests/pipeline/test_pipeline_mesh.py).

The handshake is bounded: bad flags are refused before any work, and a
missing process ends every process after `--init-timeout` with `error:`
naming the coordinator and the missing ids (JAX's own handshake would abort
the process after 300 s, exit 134).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tests.helpers import tiny_models as H


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
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


CLI = [sys.executable, "-m", "sgtv_jax.cli", "merge", "missing.yaml", "out"]


def _sgtv(tmp_path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(CLI + list(flags), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "flags, culprit",
    [
        (["--coordinator", "nonsense", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (["--coordinator", "localhost:70000", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (["--coordinator", "localhost:0", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (["--num-processes", "2"], "--num-processes needs --coordinator and --process-id"),
        (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes and --process-id"),
        (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
        (["--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
        (["--init-timeout", "0"], "--init-timeout"),
        (["--init-timeout", "nan"], "--init-timeout"),
    ],
)
def test_bad_multihost_flags(tmp_path, flags, culprit):
    """Refused before any work (the config does not even exist): exit 2, one `error:` line naming the flag."""
    r = _sgtv(tmp_path, *flags, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "error:" in last and culprit in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_missing_process_times_out(tmp_path):
    """Process 0 of 3 with only process 1 present: both end after --init-timeout, naming the missing id."""
    port = _free_port()
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", "3", "--init-timeout", "4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.monotonic()
    procs = {}
    for i in (1, 0):  # process 1 first: its own deadline falls before process 0's, which alone knows who is missing
        procs[i] = subprocess.Popen(
            CLI + flags + ["--process-id", str(i)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        time.sleep(1.0)
    procs = [procs[0], procs[1]]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert time.monotonic() - t0 < 60
    for p, err in zip(procs, errs):
        last = err.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error:") and f"localhost:{port}" in last, err[-2000:]
        assert "process(es) 2 of 3" in last, last  # the missing id, not the one that came
    assert "waiting at" in errs[0] and "for process(es) 1, 2 of 3" in errs[0]


def test_no_coordinator_times_out(tmp_path):
    """A non-zero process whose process 0 never starts ends after --init-timeout with the coordinator named."""
    port = _free_port()
    r = _sgtv(tmp_path, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "1",
              "--init-timeout", "2")  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and f"localhost:{port}" in last, r.stderr[-2000:]
    assert "process 0 did not answer within 2 s" in last and "waiting for process 0" in r.stderr


def test_disagreeing_process_counts(tmp_path):
    """Two processes started with different --num-processes: both refuse, naming the disagreement."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = ["--coordinator", f"localhost:{port}", "--init-timeout", "30"]
    procs = [
        subprocess.Popen(CLI + base + more, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for more in (["--num-processes", "2", "--process-id", "0"], ["--num-processes", "3", "--process-id", "1"])
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):
        last = err.strip().splitlines()[-1]
        assert p.returncode == 2 and "started with --num-processes 3, process 0 with 2" in last, err[-2000:]
