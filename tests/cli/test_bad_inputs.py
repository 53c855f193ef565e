"""Bad input through the CLI: exit status 2, a message naming the culprit, and no input byte changed.

Every case runs `sgtv_jax.cli.main([...])` in-process on tiny LLaMA checkpoints
(`tests.helpers.tiny_models`), with the sha256 of every file under the input
folders taken before and compared after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from sgtv_jax.cli import main
from tests.helpers import tiny_models as H

NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    paths = H.make_family(root, "llama")
    # a fine-tune with one NaN, and a base that allows 10**7 positions (for the memory guard)
    nan_dir = root / "ft_nan"
    shutil.copytree(paths["fts"][0], nan_dir)
    sd = load_file(str(nan_dir / "model.safetensors"))
    sd[NAN_TENSOR] = sd[NAN_TENSOR].copy()
    sd[NAN_TENSOR][3, 5] = np.nan
    save_file(sd, str(nan_dir / "model.safetensors"), metadata={"format": "pt"})
    (root / "bad.txt").write_bytes(b"calibration \xff\xfe text\n")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello\n")
    return root, paths


def _digests(*roots: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for r in roots:
        for p in sorted(r.rglob("*")):
            rel = p.relative_to(r)
            if p.is_file() and not any(rel.parts[0].startswith(s) for s in skip):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Case:
    """Writes configs under `tmp`, runs the CLI, checks exit code, message and input bytes."""

    def __init__(self, fam, tmp: pathlib.Path, capsys) -> None:
        self.root, self.paths = fam
        self.tmp = tmp
        self.capsys = capsys

    def raw(self, **over):
        return H.config_dict(self.paths, self.root, **over)

    def data_free(self, **over):
        raw = self.raw(trim=None, **over)
        raw.pop("calibration")
        return raw

    def yaml(self, raw, name: str = "m.yaml") -> str:
        p = self.tmp / name
        p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
        return str(p)

    def run(self, argv, *, code: int = 2, names: tuple[str, ...] = (), timeout: float | None = None) -> str:
        before = _digests(self.root, self.tmp, skip=("out",))
        self.capsys.readouterr()
        with _deadline(timeout):
            rc = main(list(argv))
        out, err = self.capsys.readouterr()
        assert rc == code, (rc, out, err)
        if code == 2:
            assert err.startswith("error: ") and "Traceback" not in err, err
        for n in names:
            assert n in err, (n, err)
        assert _digests(self.root, self.tmp, skip=("out",)) == before, "an input file changed"
        return err


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""
    if seconds is None:
        yield
        return

    def boom(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def case(fam, tmp_path, capsys):
    return Case(fam, tmp_path, capsys)


# --------------------------------------------------------------------------- YAML


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.mark.parametrize("cmd", ["check", "merge"])
def test_alias_bomb_as_merge_method_refused_fast(case, cmd):
    text = BOMB + yaml.safe_dump(case.data_free()).replace("merge_method: ties", "merge_method: *g")
    argv = [cmd, case.yaml(text)] + ([str(case.tmp / "out"), "--quiet"] if cmd == "merge" else [])
    t0 = time.perf_counter()
    case.run(argv, names=("m.yaml:2", "alias"), timeout=20)
    assert time.perf_counter() - t0 < 10
    assert not (case.tmp / "out").exists()


def test_alias_bomb_as_parameter_value_refused_fast(case):
    text = BOMB + yaml.safe_dump(case.data_free()).replace("normalize: true", "normalize: *g")
    case.run(["merge", case.yaml(text), str(case.tmp / "out"), "--quiet"], names=("m.yaml:2", "alias"), timeout=20)


@pytest.mark.parametrize(
    "body, names",
    [
        ("", ("m.yaml", "empty")),
        ("- merge_method: ties\n", ("m.yaml", "mapping", "list")),
        ("merge_method: [ties\n", ("m.yaml", "not valid YAML")),
    ],
)
def test_yaml_shapes(case, body, names):
    case.run(["check", case.yaml(body)], names=names)


def test_non_utf8_yaml_names_the_file(case):
    p = case.tmp / "latin1.yaml"
    p.write_bytes(yaml.safe_dump(case.data_free()).encode() + b"# caf\xe9\n")
    case.run(["check", str(p)], names=(str(p), "not UTF-8"))


# --------------------------------------------------------------------------- parameter types and values


def _set(raw, where, key, value):
    if where == "global":
        raw["parameters"][key] = value
    else:
        raw["models"][where]["parameters"][key] = value
    return raw


@pytest.mark.parametrize(
    "where, key, value, names",
    [
        ("global", "normalize", "false", ("parameters.normalize must be true or false, got 'false'",)),
        ("global", "lambda", "big", ("parameters.lambda must be a number", "'big'")),
        ("global", "lambda", float("inf"), ("parameters.lambda must be finite, got inf",)),
        ("global", "consensus", "max", ("parameters.consensus must be one of sum, count",)),
        (0, "density", "0.5", ("models[0].parameters.density must be a number", "'0.5'")),
        (0, "density", float("nan"), ("models[0].parameters.density must be finite, got nan",)),
        (1, "weight", float("inf"), ("models[1].parameters.weight must be finite, got inf",)),
        (1, "weight", float("-inf"), ("models[1].parameters.weight must be finite, got -inf",)),
        (0, "density", -0.1, ("models[0].parameters.density must be in [0.0, 1.0], got -0.1",)),
        (0, "density", [1.0, float("nan")], ("models[0].parameters.density must be finite, got nan",)),
        (
            1,
            "weight",
            [{"filter": "mlp", "value": float("nan")}, {"value": 1.0}],
            ("models[1].parameters.weight must be finite, got nan",),
        ),
        ("global", "density", float("inf"), ("parameters.density must be finite, got inf",)),
        ("global", "refit", True, ("unknown key 'refit' in parameters", "top-level")),
    ],
)
def test_bad_parameter_value_named(case, where, key, value, names):
    raw = _set(case.data_free(), where, key, value)
    case.run(["check", case.yaml(raw)], names=names)


@pytest.mark.parametrize(
    "over, names",
    [
        ({"merge_methd": "ties"}, ("unknown key 'merge_methd'", "did you mean 'merge_method'")),
        ({"merge_method": "tie"}, ("unknown merge_method 'tie'", "did you mean 'ties'")),
        ({"percdamp": float("nan")}, ("percdamp must be a finite number",)),
        ({"calibration": {"data": "calib.txt", "seqlen": "long"}}, ("calibration.seqlen must be an integer",)),
    ],
)
def test_bad_top_level_key_named(case, over, names):
    case.run(["check", case.yaml(case.raw(**over))], names=names)


@pytest.mark.parametrize(
    "over",
    [
        {"parameters": {"normalize": "false"}},
        {"merge_method": "tie"},
        {"base_model": "/nonexistent/base"},
    ],
)
def test_check_and_merge_agree(case, over):
    path = case.yaml(case.data_free(**over))
    err_check = case.run(["check", path])
    err_merge = case.run(["merge", path, str(case.tmp / "out"), "--quiet"])
    assert err_check == err_merge
    assert not (case.tmp / "out").exists()


# --------------------------------------------------------------------------- checkpoints and data


def test_missing_base_model(case):
    case.run(
        ["check", case.yaml(case.data_free(base_model="no_such_base"))],
        names=("base_model", "no_such_base", "does not exist"),
    )


def test_non_utf8_calibration_file_names_it(case):
    raw = case.raw()
    raw["calibration"]["data"] = str(case.root / "bad.txt")
    for argv in (["check"], ["merge"]):
        extra = [str(case.tmp / "out"), "--quiet"] if argv == ["merge"] else []
        case.run(argv + [case.yaml(raw)] + extra, names=("bad.txt", "not UTF-8"))


@pytest.mark.parametrize("trim", ["magnitude", "sparsegpt"])
def test_nan_in_finetune_names_tensor_and_model_as_written(case, trim):
    raw = case.raw(trim=trim)
    if trim == "magnitude":
        raw.pop("calibration")
    raw["models"][0]["model"] = "ft_nan"  # relative to the YAML's folder, as a user writes it
    (case.tmp / "ft_nan").symlink_to(case.root / "ft_nan")
    err = case.run(
        ["merge", case.yaml(raw), str(case.tmp / "out"), "--quiet"], names=(NAN_TENSOR, "models[0] (ft_nan)", "NaN")
    )
    assert str(case.root) not in err
    assert not (case.tmp / "out").exists()


def test_huge_seqlen_refused_by_memory_guard_before_weights(case, monkeypatch):
    long_base = case.tmp / "base_long"
    shutil.copytree(case.paths["base"], long_base)
    c = json.loads((long_base / "config.json").read_text())
    c["max_position_embeddings"] = 10**7
    (long_base / "config.json").write_text(json.dumps(c))
    raw = case.raw(base_model=str(long_base))
    raw["calibration"]["seqlen"] = 10**7
    from convert.safetensors_reader import SafetensorsCheckpoint

    def no_reads(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", no_reads)
    cfg = case.yaml(raw)
    case.run(["merge", cfg, str(case.tmp / "out"), "--quiet"], names=("seqlen", "--force", "attention"))
    case.run(["check", cfg], names=("seqlen",))
    assert not (case.tmp / "out").exists()


def test_force_overrides_the_memory_guard(case, monkeypatch):
    import sgtv_jax.pipeline.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    cfg = case.yaml(case.data_free())
    case.run(["merge", cfg, str(case.tmp / "out"), "--quiet"], names=("available", "--force"))
    case.run(["merge", cfg, str(case.tmp / "out"), "--quiet", "--force"], code=0)
    assert (case.tmp / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the file system


def test_read_only_output_parent_named(case, monkeypatch):
    ro = case.tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root ignores permissions: make mkdir under `ro` fail as it would for a user
        real = pathlib.Path.mkdir

        def mkdir(self, *a, **k):
            if self.parent == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    try:
        case.run(
            ["merge", case.yaml(case.data_free()), str(ro / "out"), "--quiet"], names=(str(ro), "Permission denied")
        )
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_disk_full_named(case, monkeypatch):
    from convert.safetensors_writer import StreamingSafetensorsWriter

    def full(self, name, arr):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._data_path))

    monkeypatch.setattr(StreamingSafetensorsWriter, "add", full)
    case.run(
        ["merge", case.yaml(case.data_free()), str(case.tmp / "out"), "--quiet"],
        names=("no space left on device", str(case.tmp)),
    )
    assert not (case.tmp / "out").exists()


@pytest.mark.parametrize("kind", ["xla", "host"])
def test_out_of_memory_is_an_error_line(case, monkeypatch, kind):
    import jax

    import sgtv_jax.pipeline.sequential as seq

    def oom(*a, **k):
        if kind == "host":
            raise MemoryError
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB.")

    monkeypatch.setattr(seq, "run_merge", oom)
    case.run(
        ["merge", case.yaml(case.data_free()), str(case.tmp / "out"), "--quiet"],
        names=("out of memory", "sgtv merge", "batch_size / seqlen / nsamples"),
    )


def test_interrupt_exits_130(case, monkeypatch):
    import sgtv_jax.pipeline.sequential as seq

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(seq, "run_merge", interrupted)
    err = case.run(["merge", case.yaml(case.data_free()), str(case.tmp / "out"), "--quiet"], code=130)
    assert "interrupted" in err


def test_a_bug_keeps_its_traceback(case, monkeypatch):
    import sgtv_jax.pipeline.sequential as seq

    def bug(*a, **k):
        raise AttributeError("a real bug")

    monkeypatch.setattr(seq, "run_merge", bug)
    with pytest.raises(AttributeError, match="a real bug"):
        main(["merge", case.yaml(case.data_free()), str(case.tmp / "out"), "--quiet"])


def test_debug_shows_the_traceback(case):
    path = case.yaml(case.data_free(parameters={"normalize": "false"}))
    case.capsys.readouterr()
    assert main(["--debug", "check", path]) == 2
    err = case.capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert "error: " in err and "parameters.normalize" in err


# --------------------------------------------------------------------------- eval and convert


@pytest.mark.parametrize("cmd", ["eval", "convert"])
def test_missing_model_dir(case, cmd, tmp_path):
    src = str(tmp_path / "no_such_model")
    argv = [cmd, src, "--text", str(case.root / "calib.txt")] if cmd == "eval" else [cmd, src, str(tmp_path / "out")]
    case.run(argv, names=("no_such_model",))


@pytest.mark.parametrize("cmd", ["eval", "convert"])
def test_directory_without_a_model(case, cmd, tmp_path):
    src = str(case.root / "not_a_model")
    argv = [cmd, src, "--text", str(case.root / "calib.txt")] if cmd == "eval" else [cmd, src, str(tmp_path / "out")]
    case.run(argv, names=("not_a_model", "no checkpoint"))
    assert not (tmp_path / "out").exists()


def test_eval_non_utf8_text_names_it(case):
    case.run(["eval", str(case.paths["base"]), "--text", str(case.root / "bad.txt")], names=("bad.txt", "not UTF-8"))


def test_python_m_convert_uses_the_same_guard(case, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    res = subprocess.run(
        [sys.executable, "-m", "convert", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "nope" in res.stderr, res.stderr


# --------------------------------------------------------------------------- what a published model records


def test_report_and_card_keep_paths_as_written(case):
    """A YAML with relative paths: no absolute local path reaches merge_report.json or README.md."""
    for name in ("base", "ft0", "ft1"):
        (case.tmp / name).symlink_to(case.root / name)
    raw = case.raw(base_model="base", hessian_source="base")
    raw["models"][0]["model"], raw["models"][1]["model"] = "ft0", "./ft1"
    shutil.copy(case.root / "calib.txt", case.tmp / "calib.txt")
    raw["calibration"]["data"] = "calib.txt"
    case.run(["merge", case.yaml(raw), str(case.tmp / "out"), "--quiet"], code=0)
    report = json.loads((case.tmp / "out" / "merge_report.json").read_text())
    assert report["config"]["base_model"] == "base"
    assert [m["model"] for m in report["config"]["models"]] == ["ft0", "./ft1"]
    assert report["config"]["calibration"]["data"] == ["calib.txt"]
    for f in ("merge_report.json", "README.md"):
        text = (case.tmp / "out" / f).read_text()
        assert str(case.tmp) not in text and str(case.root) not in text, f
    # the model card: Hub front matter with the models as written, and the YAML as given, ready to rerun
    meta, block = H.read_card(case.tmp / "out" / "README.md")
    H.assert_hub_card(meta, ["base", "ft0", "./ft1"], "ties")
    assert block == raw
    assert not any(os.path.isabs(m) for m in meta["base_model"])
