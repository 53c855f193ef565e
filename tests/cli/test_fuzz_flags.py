"""Property-based fuzzing of the subcommands' flag values (the property: `tests.helpers.fuzz`).

`sgtv merge` (OUT targets, --format, --lora, --devices, switches, and in a
subprocess the multi-host flags), `sgtv convert` (sources, --dtype,
--max-shard-size), `sgtv extract-lora` (--rank), `sgtv eval` (data files,
--seqlen) and `sgtv check` (config paths). Example counts and the longer
maintainer run: see tests/cli/test_fuzz.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.fuzz import Example, dump_yaml, fuzz_settings, make_world, run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with make_world(tmp_path_factory.mktemp("fuzzf")) as w:
        yield w


# --------------------------------------------------------------------------- flags

INT_TEXT = ["0", "1", "2", "3", "-1", "64", "1" + "0" * 400, "1e3", "1.5", " 2", "0x10", "x", "", "inf", "nan"]
SIZES = ["1KB", "20KB", "0.5KB", "1.5MB", "5GB", "5gb", "1", "0", "-1GB", "x", "", "MB", "10 KB", "1e3KB"]


def _out_target(ex: Example, kind: str) -> Path:
    """OUT for a run: fresh, an existing file / folder / output, or a path inside an input."""
    fam = ex.world["fam"]
    if kind == "file":
        (ex.dir / "taken").write_text("mine\n")
        return ex.dir / "taken"
    if kind == "nonempty":
        (ex.dir / "full").mkdir()
        (ex.dir / "full" / "notes.txt").write_text("mine\n")
        return ex.dir / "full"
    if kind == "empty":
        (ex.dir / "empty").mkdir()
        return ex.dir / "empty"
    if kind in ("input", "inside input"):
        return fam / "ft0" if kind == "input" else fam / "ft0" / "sub"
    return ex.dir / ("out" if kind == "fresh" else "deep/er/out")


OUT_KINDS = ["fresh", "fresh", "file", "nonempty", "empty", "input", "inside input", "nested"]


def _data_free_config(ex: Example) -> Path:
    w = ex.world
    raw = {
        "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}} for m in w["fts"]],
        "merge_method": "ties",
        "base_model": str(w["base"]),
        "dtype": "float32",
    }
    p = ex.dir / "m.yaml"
    p.write_text(dump_yaml(raw))
    return p


def _run_with_out(ex: Example, argv: list, out: Path, fmt: str = "hf") -> None:
    """Run with OUT `out`; an OUT written inside the family (a model folder the command does not
    read: allowed) is removed afterwards, so the next example sees the family unchanged."""
    try:
        ex.run(argv, out=out, fmt=fmt)
    finally:
        if not _inside_dir(out, ex.dir) and out.name == "sub":
            shutil.rmtree(out, ignore_errors=True)


def _inside_dir(p: Path, top: Path) -> bool:
    return p == top or top in p.parents


@fuzz_settings(15)
@given(
    out_kind=st.sampled_from(OUT_KINDS),
    fmt=st.sampled_from(["hf", "orbax"]),
    lora=st.one_of(st.none(), st.sampled_from(INT_TEXT)),
    devices=st.one_of(st.none(), st.sampled_from(["all", "1", "2", "0", "-1", "x", "1" + "0" * 400])),
    switches=st.sets(st.sampled_from(["--overwrite", "--quiet", "--force"])),
)
def test_fuzz_merge_flags(world, out_kind, fmt, lora, devices, switches):
    with Example(world) as ex:
        out = _out_target(ex, out_kind)
        argv = ["merge", _data_free_config(ex), out, "--format", fmt, *sorted(switches)]
        argv += [] if lora is None else ["--lora", lora]
        argv += [] if devices is None else ["--devices", devices]
        _run_with_out(ex, argv, out, fmt)


@fuzz_settings(12)
@given(
    src=st.sampled_from(["ft0", "base", "nope", "calib.txt", "tokenizer", "adapter", "narrow"]),
    out_kind=st.sampled_from(OUT_KINDS),
    fmt=st.sampled_from(["hf", "orbax"]),
    dtype=st.one_of(st.none(), st.sampled_from(["auto", "bf16", "fp16", "fp32", "float32", ""])),
    shard=st.one_of(st.none(), st.sampled_from(SIZES)),
    switches=st.sets(st.sampled_from(["--overwrite", "-q"])),
)
def test_fuzz_convert_flags(world, src, out_kind, fmt, dtype, shard, switches):
    with Example(world) as ex:
        out = _out_target(ex, out_kind)
        argv = ["convert", world["fam"] / src, out, "--format", fmt, *sorted(switches)]
        argv += [] if dtype is None else ["--dtype", dtype]
        argv += [] if shard is None else ["--max-shard-size", shard]
        _run_with_out(ex, argv, out, fmt)


@fuzz_settings(10)
@given(
    model=st.sampled_from(["ft0", "base", "narrow", "nope", "adapter", "calib.txt"]),
    against=st.sampled_from(["base", "ft1", "narrow", "nope"]),
    out_kind=st.sampled_from(OUT_KINDS),
    rank=st.sampled_from(INT_TEXT),
    switches=st.sets(st.sampled_from(["--overwrite", "--no-modules-to-save"])),
)
def test_fuzz_extract_lora_flags(world, model, against, out_kind, rank, switches):
    fam = world["fam"]
    with Example(world) as ex:
        out = _out_target(ex, out_kind)
        argv = ["extract-lora", fam / model, fam / against, out, "--rank", rank, *sorted(switches)]
        _run_with_out(ex, argv, out, "adapter")


def _data_file(ex: Example, kind: str) -> Path:
    fam = ex.world["fam"]
    files = {"txt": fam / "calib.txt", "jsonl": fam / "calib.jsonl", "nope": fam / "nope.txt", "dir": fam / "base"}
    if kind in files:
        return files[kind]
    p = ex.dir / f"data.{kind}"
    p.write_bytes({"empty": b"", "binary": b"\xff\xfe\x00\x01" * 50, "badjson": b'{"prompt": 1}\n[1]\n{\n'}[kind])
    return p


DATA_KINDS = ["txt", "jsonl", "nope", "dir", "empty", "binary", "badjson"]


@fuzz_settings(10)
@given(
    model=st.sampled_from(["ft0", "narrow", "nope", "adapter", "tokenizer"]),
    text=st.one_of(st.none(), st.sampled_from(DATA_KINDS)),
    jsonl=st.one_of(st.none(), st.sampled_from(DATA_KINDS)),
    seqlen=st.one_of(st.none(), st.sampled_from(["8", "16", "x", "1.5", ""])),
)
def test_fuzz_eval_flags(world, model, text, jsonl, seqlen):
    with Example(world) as ex:
        argv: list[Any] = ["eval", world["fam"] / model]
        argv += [] if text is None else ["--text", _data_file(ex, text)]
        argv += [] if jsonl is None else ["--jsonl", _data_file(ex, jsonl)]
        argv += [] if seqlen is None else ["--seqlen", seqlen]
        ex.run(argv)


@fuzz_settings(8)
@given(config=st.sampled_from(["nope", "dir", "empty", "binary", "devnull", "list", "fine"]), force=st.booleans())
def test_fuzz_check_paths(world, config, force):
    with Example(world) as ex:
        path = {
            "nope": ex.dir / "nope.yaml",
            "dir": ex.dir,
            "devnull": Path("/dev/null"),
            "fine": _data_free_config(ex),
        }.get(config)
        if path is None:
            path = ex.dir / "c.yaml"
            path.write_bytes({"empty": b"", "binary": b"\xff\x00" * 20, "list": b"- 1\n- 2\n"}[config])
        ex.run(["check", path] + (["--force"] if force else []))


@fuzz_settings(2)
@given(
    coordinator=st.sampled_from(["nonsense", "localhost:99999", "localhost:0", ":", "localhost:23456", "[::1]:x"]),
    processes=st.sampled_from(["2", "1", "0", "-1", None]),
    process_id=st.sampled_from(["0", "1", "5", "-1", None]),
)
def test_fuzz_multihost_flags(world, coordinator, processes, process_id):
    """In a subprocess: a handshake that never completes blocks in native code, out of the deadline's reach."""
    with Example(world) as ex:
        out = ex.dir / "out"
        argv = ["merge", _data_free_config(ex), out, "--quiet", "--coordinator", coordinator]
        argv += [] if processes is None else ["--num-processes", processes]
        argv += [] if process_id is None else ["--process-id", process_id]
        run_cli(argv, ex.watch, out, note=ex.note, subprocess_s=40)


@fuzz_settings(5)
@given(
    which=st.sampled_from(["eval", "convert"]),
    value=st.sampled_from(["0", "-1", "1", "1" + "0" * 400, "infGB", "1e400MB", "nanGB", "-0GB", "1e-9KB", "0.1B"]),
)
def test_fuzz_numeric_flags(world, which, value):
    """`sgtv eval --seqlen` and `sgtv convert --max-shard-size` at zero, negative, huge and non-finite values."""
    fam = world["fam"]
    with Example(world) as ex:
        if which == "eval":
            ex.run(["eval", fam / "ft0", "--text", fam / "calib.txt", "--seqlen", value.rstrip("GKMB") or "0"])
        else:
            out = ex.dir / "out"
            ex.run(["convert", fam / "ft0", out, "-q", "--max-shard-size", value], out=out)
