"""Output safety and file containment, through the `sgtv` command line.

Every refused case asserts: exit status 2, a message naming the culprit path,
and that every input file's bytes (sha256 over all files under the input
directories, symlinks recorded by target) are unchanged, with nothing deleted
or added. The positive cases check that `--overwrite` replaces previous
outputs completely, that HF-cache snapshots still work, that leftovers of
killed runs are cleaned (only ours), and that a crash while committing keeps
the old output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from convert.atomic import OUTPUT_MARKER, PARTIAL_MARKER, remove_leftovers
from sgtv_jax.cli import main
from sgtv_jax.pipeline.config import load_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

os.environ["HF_HUB_OFFLINE"] = "1"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny LLaMA base + 2 fine-tunes, and a calibration file in a folder of its own."""
    root = tmp_path_factory.mktemp("fam")
    paths = H.make_family(root, "llama")
    (root / "calibdir").mkdir()
    shutil.copy(root / "calib.txt", root / "calibdir" / "calib.txt")
    secret = tmp_path_factory.mktemp("secret") / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY----- not for publishing\n")
    return {
        "root": root,
        "base": paths["base"],
        "fts": paths["fts"],
        "calib": root / "calibdir" / "calib.txt",
        "secret": secret,
    }


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots`: files by sha256, symlinks by target, folders by existence."""
    snap: dict[str, tuple] = {}
    for r in roots:
        if os.path.islink(r) or os.path.isfile(r):
            snap[str(r)] = _entry(Path(r))
            continue
        for dirpath, dirs, files in os.walk(r):
            snap[dirpath] = ("dir",)
            for n in dirs + files:
                snap[os.path.join(dirpath, n)] = _entry(Path(dirpath) / n)
    return snap


def _entry(p: Path) -> tuple:
    if p.is_symlink():
        return ("link", os.readlink(p))
    if p.is_dir():
        return ("dir",)
    return ("file", hashlib.sha256(p.read_bytes()).hexdigest())


def write_cfg(dst: Path, fam, *, base=None, data=False, **over) -> Path:
    """A data-free TIES config (or, with `data`, SparseGPT + the calibration file) as YAML."""
    raw = H.config_dict({"base": base or fam["base"], "fts": fam["fts"]}, fam["root"], **over)
    if data:
        raw["calibration"]["data"] = str(fam["calib"])
    else:
        raw["trim"] = None
        raw.pop("calibration")
    dst.write_text(yaml.safe_dump(raw))
    return dst


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_refused(capsys, args, culprits, roots) -> str:
    before = snapshot(*roots)
    rc, err = cli(capsys, *args)
    assert rc == 2, err
    assert err.startswith("error: "), err
    for c in culprits:
        assert str(c) in err, (c, err)
    assert snapshot(*roots) == before, "an input or the output target changed"
    return err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def make_index(model_dir: Path, shard_name: str) -> None:
    """Replace model.safetensors by an index that puts every tensor in `shard_name`."""
    names = list(load_file(str(model_dir / "model.safetensors")))
    (model_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: shard_name for n in names}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


# --------------------------------------------------------------------------- the refusal matrix

# Each case: (name, build(fam, tmp) -> (argv, culprits, extra roots to snapshot)).


def _merge(tmp, fam, out, *flags, **kw):
    return ["merge", write_cfg(tmp / "m.yaml", fam, **kw), out, "--quiet", *flags]


def _c_out_is_base(fam, tmp):
    return _merge(tmp, fam, fam["base"], "--overwrite"), [fam["base"], "base_model"], []


def _c_out_is_base_no_overwrite(fam, tmp):
    return _merge(tmp, fam, fam["base"]), [fam["base"], "base_model"], []


def _c_out_is_base_orbax(fam, tmp):
    return _merge(tmp, fam, fam["base"], "--overwrite", "--format", "orbax"), [fam["base"]], []


def _c_out_is_finetune(fam, tmp):
    return _merge(tmp, fam, fam["fts"][1], "--overwrite"), [fam["fts"][1], "models[1].model"], []


def _c_out_inside_base(fam, tmp):
    return _merge(tmp, fam, fam["base"] / "merged"), [fam["base"] / "merged", "lies inside base_model"], []


def _c_out_contains_models(fam, tmp):
    return _merge(tmp, fam, fam["root"], "--overwrite"), [fam["root"], "contains"], []


def _c_out_is_calibration_dir(fam, tmp):
    out = fam["calib"].parent
    return _merge(tmp, fam, out, "--overwrite", data=True), [out, "calibration.data[0]"], []


def _c_out_is_calibration_file(fam, tmp):
    return _merge(tmp, fam, fam["calib"], "--overwrite", data=True), [fam["calib"], "calibration.data[0]"], []


def _c_out_symlink_to_base(fam, tmp):
    link = tmp / "out"
    link.symlink_to(fam["base"], target_is_directory=True)
    return _merge(tmp, fam, link, "--overwrite"), [link, fam["base"]], [link]


def _c_out_symlink_to_parent_of_models(fam, tmp):
    link = tmp / "out"
    link.symlink_to(fam["root"], target_is_directory=True)
    return _merge(tmp, fam, link, "--overwrite"), [link, "contains"], [link]


def _c_out_dot(fam, tmp):
    work = tmp / "work"
    work.mkdir()
    os.chdir(work)
    return _merge(tmp, fam, ".", "--overwrite"), ["output . is the current directory"], [work]


def _c_out_contains_cwd(fam, tmp):
    work = tmp / "a" / "b"
    work.mkdir(parents=True)
    os.chdir(work)
    return _merge(tmp, fam, tmp / "a", "--overwrite"), [tmp / "a", "contains the current directory"], []


def _c_out_foreign_dir(fam, tmp):
    out = tmp / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    return _merge(tmp, fam, out, "--overwrite"), [out, "not an output of sgtv-jax", "holiday.jpg"], []


def _c_out_symlink_to_foreign_dir(fam, tmp):
    real = tmp / "photos"
    real.mkdir()
    (real / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    link = tmp / "out"
    link.symlink_to(real, target_is_directory=True)
    return _merge(tmp, fam, link, "--overwrite"), [real, "symlink", "holiday.jpg"], []


def _c_out_regular_file(fam, tmp):
    out = tmp / "notes.txt"
    out.write_text("my notes")
    return _merge(tmp, fam, out, "--overwrite"), [out, "is a file"], []


def _c_out_regular_file_no_overwrite(fam, tmp):
    out = tmp / "notes.txt"
    out.write_text("my notes")
    return _merge(tmp, fam, out), [out, "already exists"], []


def _c_out_dangling_symlink(fam, tmp):
    link = tmp / "out"
    link.symlink_to(tmp / "nowhere")
    return _merge(tmp, fam, link, "--overwrite"), [link, "does not exist"], []


def _c_tokenizer_link_to_secret(fam, tmp):
    base = copy_model(fam["base"], tmp / "base")
    (base / "tokenizer_config.json").unlink()
    (base / "tokenizer_config.json").symlink_to(fam["secret"])
    return (_merge(tmp, fam, tmp / "out", base=base), [base / "tokenizer_config.json", fam["secret"]], [fam["secret"]])


def _c_tokenizer_link_into_sibling(fam, tmp):
    base = copy_model(fam["base"], tmp / "base")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(fam["fts"][0] / "tokenizer.json")
    return _merge(tmp, fam, tmp / "out", base=base), [base / "tokenizer.json", fam["fts"][0]], []


def _c_generation_config_relative_link_out(fam, tmp):
    base = copy_model(fam["base"], tmp / "base")
    (tmp / "gen.json").write_text('{"secret": 1}')
    (base / "generation_config.json").unlink()
    (base / "generation_config.json").symlink_to("../gen.json")
    return _merge(tmp, fam, tmp / "out", base=base), [base / "generation_config.json", tmp / "gen.json"], []


def _c_config_json_link_out(fam, tmp):
    base = copy_model(fam["base"], tmp / "base")
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(fam["fts"][0] / "config.json")
    return _merge(tmp, fam, tmp / "out", base=base), [base / "config.json"], []


def _c_index_shard_parent(fam, tmp):
    copy_model(fam["base"], tmp / "other")
    base = copy_model(fam["base"], tmp / "base")
    make_index(base, "../other/model.safetensors")
    return (
        _merge(tmp, fam, tmp / "out", base=base),
        [base / "model.safetensors.index.json", "../other/model.safetensors"],
        [],
    )


def _c_index_shard_absolute(fam, tmp):
    other = copy_model(fam["base"], tmp / "other")
    base = copy_model(fam["base"], tmp / "base")
    make_index(base, str(other / "model.safetensors"))
    return _merge(tmp, fam, tmp / "out", base=base), ["model.safetensors.index.json", other / "model.safetensors"], []


def _c_index_shard_symlink_out(fam, tmp):
    other = copy_model(fam["base"], tmp / "other")
    base = copy_model(fam["base"], tmp / "base")
    make_index(base, "model-00001-of-00001.safetensors")
    (base / "model-00001-of-00001.safetensors").symlink_to(other / "model.safetensors")
    return (
        _merge(tmp, fam, tmp / "out", base=base),
        ["model-00001-of-00001.safetensors", other / "model.safetensors"],
        [],
    )


def _c_single_file_symlink_out(fam, tmp):
    other = copy_model(fam["base"], tmp / "other")
    base = copy_model(fam["base"], tmp / "base")
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(other / "model.safetensors")
    return _merge(tmp, fam, tmp / "out", base=base), [base, other / "model.safetensors"], []


def _c_finetune_index_shard_parent(fam, tmp):
    copy_model(fam["fts"][0], tmp / "other")
    ft = copy_model(fam["fts"][0], tmp / "ft")
    make_index(ft, "../other/model.safetensors")
    cfg = write_cfg(tmp / "m.yaml", fam)
    raw = yaml.safe_load(cfg.read_text())
    raw["models"][0]["model"] = str(ft)
    cfg.write_text(yaml.safe_dump(raw))
    return ["merge", cfg, tmp / "out", "--quiet"], [ft / "model.safetensors.index.json", "../other"], []


def _c_convert_dst_is_src(fam, tmp):
    return ["convert", fam["base"], fam["base"], "--overwrite", "-q"], [fam["base"], "the source"], []


def _c_convert_dst_inside_src(fam, tmp):
    dst = fam["base"] / "converted"
    return ["convert", fam["base"], dst, "-q"], [dst, "lies inside the source"], []


def _c_convert_dst_contains_src(fam, tmp):
    return ["convert", fam["base"], fam["root"], "--overwrite", "-q"], [fam["root"], "contains the source"], []


def _c_convert_orbax_dst_is_src(fam, tmp):
    return (
        ["convert", fam["base"], fam["base"], "--overwrite", "--format", "orbax", "-q"],
        [fam["base"], "the source"],
        [],
    )


def _c_convert_dot(fam, tmp):
    work = tmp / "work"
    work.mkdir()
    os.chdir(work)
    return ["convert", fam["base"], ".", "--overwrite", "-q"], ["current directory"], [work]


def _c_convert_tokenizer_link_to_secret(fam, tmp):
    src = copy_model(fam["base"], tmp / "src")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(fam["secret"])
    return ["convert", src, tmp / "out", "-q"], [src / "tokenizer.json", fam["secret"]], [fam["secret"]]


def _c_convert_foreign_dir(fam, tmp):
    out = tmp / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return ["convert", fam["base"], out, "--overwrite", "-q"], [out, "thesis.tex"], []


CASES = {n[3:]: f for n, f in dict(globals()).items() if n.startswith("_c_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused(case, fam, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cases that chdir are undone by monkeypatch
    argv, culprits, extra = CASES[case](fam, tmp_path)
    err = assert_refused(capsys, argv, culprits, [fam["root"], tmp_path, *extra])
    assert "Traceback" not in err
    # no output and no partial folder appeared anywhere we write
    leftovers = [p for p in tmp_path.rglob(".*partial*")] + [p for p in fam["root"].rglob(".*partial*")]
    assert leftovers == []


def test_matrix_is_large_enough():
    assert len(CASES) >= 20


# --------------------------------------------------------------------------- positive cases


def _marker(d: Path) -> dict:
    return json.loads((d / OUTPUT_MARKER).read_text())


def _files(d: Path) -> dict[str, str]:
    skip = {OUTPUT_MARKER, "merge_report.json", "merge_layer_error.png", "report.html"}  # timings / pids differ
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.name not in skip}


def test_overwrite_previous_merge_output_and_empty_dir(fam, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "m.yaml", fam)
    cfg2 = write_cfg(tmp_path / "m2.yaml", fam, parameters={"normalize": True, "lambda": 0.5})
    fresh, out = tmp_path / "fresh2", tmp_path / "out"
    assert cli(capsys, "merge", cfg2, fresh, "--quiet")[0] == 0  # the expected result of the second merge
    out.mkdir()  # an empty directory is replaced
    rc, err = cli(capsys, "merge", cfg, out, "--quiet", "--overwrite")
    assert rc == 0, err
    assert _marker(out)["tool"] == "sgtv-jax" and _marker(out)["kind"] == "hf"
    first = _files(out)
    (out / "stale.bin").write_bytes(b"from an older run")
    rc, err = cli(capsys, "merge", cfg2, out, "--quiet", "--overwrite")
    assert rc == 0, err
    assert _files(out) == _files(fresh) != first  # complete, nothing stale, and really the new merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh2", "m.yaml", "m2.yaml", "out"]


def test_overwrite_previous_orbax_output(fam, tmp_path, capsys):
    from convert import restore_orbax

    cfg = write_cfg(tmp_path / "m.yaml", fam)
    out = tmp_path / "ob"
    assert cli(capsys, "merge", cfg, out, "--quiet", "--format", "orbax")[0] == 0
    assert _marker(out)["kind"] == "orbax"
    (out / "stale.bin").write_bytes(b"x")
    assert cli(capsys, "merge", cfg, out, "--quiet", "--format", "orbax", "--overwrite")[0] == 0
    assert not (out / "stale.bin").exists()
    model, hf_cfg = restore_orbax(out)
    assert hf_cfg["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "ob"]


def _hf_cache_snapshot(src: Path, hub: Path) -> Path:
    """Lay `src` out as the HF hub cache does: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    repo = hub / "models--tiny--llama"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def test_hf_cache_snapshot_with_blob_links_converts(fam, tmp_path, capsys):
    snap = _hf_cache_snapshot(fam["base"], tmp_path / "hub")
    before = snapshot(tmp_path / "hub")
    out = tmp_path / "out"
    rc, err = cli(capsys, "convert", snap, out, "-q")
    assert rc == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    got, want = load_file(str(out / "model.safetensors")), load_file(str(fam["base"] / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert snapshot(tmp_path / "hub") == before
    # the blob store is an input too: it cannot be the output
    rc, err = cli(capsys, "convert", snap, tmp_path / "hub" / "models--tiny--llama" / "blobs", "--overwrite", "-q")
    assert rc == 2 and "blobs" in err
    assert snapshot(tmp_path / "hub") == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs_removed_and_foreign_kept(fam, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "m.yaml", fam)
    host = socket.gethostname()
    ours = tmp_path / f".out.partial-{_dead_pid()}-deadbeef"
    ours.mkdir()
    (ours / PARTIAL_MARKER).write_text(json.dumps({"tool": "sgtv-jax", "pid": _dead_pid(), "host": host}))
    (ours / "shard-00000.tmp").write_bytes(b"half a shard")
    alive = tmp_path / ".out.partial-alive"  # a run still in progress (this process)
    alive.mkdir()
    (alive / PARTIAL_MARKER).write_text(json.dumps({"tool": "sgtv-jax", "pid": os.getpid(), "host": host}))
    foreign = tmp_path / ".out.partial-x"  # same pattern, not ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone else's")
    rc, err = cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert not ours.exists() and f"removed {ours}" in err
    assert alive.is_dir() and foreign.is_dir() and (foreign / "keep.txt").read_text() == "someone else's"
    assert str(foreign) not in err and str(alive) not in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_set_aside_output_of_killed_run_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-cafe"
    old.mkdir()
    (old / OUTPUT_MARKER).write_text(json.dumps({"tool": "sgtv-jax", "kind": "hf"}))
    (old / "model.safetensors").write_bytes(b"previous model")
    (old / PARTIAL_MARKER).write_text(
        json.dumps({"tool": "sgtv-jax", "pid": _dead_pid(), "host": socket.gethostname()})
    )
    msgs = []
    remove_leftovers(out, msgs.append)
    assert (out / "model.safetensors").read_bytes() == b"previous model" and not old.exists()
    assert not (out / PARTIAL_MARKER).exists()
    assert len(msgs) == 1 and "restored" in msgs[0]


def _fail_commit_rename(monkeypatch, name: str):
    """Make the rename of the finished partial folder onto `name` fail (e.g. a full or read-only disk)."""
    import convert.atomic as atomic

    real = os.rename

    def rename(src, dst, *a, **k):
        if Path(src).name.startswith(f".{name}.partial-") and Path(dst).name == name:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(atomic.os, "rename", rename)


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_crash_while_committing_keeps_old_output(fam, tmp_path, capsys, monkeypatch, fmt):
    cfg = write_cfg(tmp_path / "m.yaml", fam)
    out = tmp_path / "out"
    assert cli(capsys, "merge", cfg, out, "--quiet", "--format", fmt)[0] == 0
    before = snapshot(out)
    _fail_commit_rename(monkeypatch, "out")
    with pytest.raises(OSError, match="No space left"):
        run_merge(load_config(cfg), out, format=fmt, overwrite=True, progress=False)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "out"]


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_crash_while_finalizing_keeps_old_output(fam, tmp_path, capsys, monkeypatch, fmt):
    import sgtv_jax.pipeline.sequential as seq

    cfg = write_cfg(tmp_path / "m.yaml", fam)
    out = tmp_path / "out"
    assert cli(capsys, "merge", cfg, out, "--quiet", "--format", fmt)[0] == 0
    before = snapshot(out)

    def broken_plot(report, path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(seq, "plot_report", broken_plot)
    with pytest.raises(OSError, match="Read-only"):
        run_merge(load_config(cfg), out, format=fmt, overwrite=True, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "out"]


def test_demo_overwrite_refuses_foreign_and_current_directory(tmp_path, monkeypatch, capsys):
    """`sgtv demo DIR --overwrite` deletes only its own earlier work dir, never the cwd or a user folder."""
    from sgtv_jax.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for args in (["demo", str(foreign)], ["demo", str(foreign), "--overwrite"]):
        assert main(args) == 2
        assert "mine" in capsys.readouterr().err
        assert (foreign / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(foreign)
    assert main(["demo", ".", "--overwrite"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
