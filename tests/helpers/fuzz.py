"""The property every fuzz test checks, and the values it draws (tests/cli/test_fuzz*.py); not a test module.

Property of one generated input: `sgtv ...`, run in-process through
`sgtv_jax.cli.main`, exits 0 with a loadable output (config.json loads with
transformers' AutoConfig, every safetensors file reads) or exits 2 with the
last stderr line starting `error:`; never a traceback or another status, never
longer than the per-example deadline; every file under the watched folders
(inputs and the example's own folder) keeps its bytes, and nothing appears
there outside OUT; the temporary directory is left as it was.

`SGTV_FUZZ_EXAMPLES=N` runs N examples per fuzz test instead of the small CI
count (derandomized: the same N examples on every run);
`SGTV_FUZZ_DEADLINE=S` is the per-example bound in seconds (default 60);
`SGTV_FUZZ_LOG=FILE` appends every failing example to FILE and goes on (a
survey of all failures rather than the first); `SGTV_FUZZ_SHRINK=1` shrinks a
failing example to a minimal one (off by default: one example takes seconds,
so shrinking can take many minutes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from sgtv_jax.cli import main
from tests.helpers import tiny_models as H

EXAMPLES_ENV = "SGTV_FUZZ_EXAMPLES"
DEADLINE_ENV = "SGTV_FUZZ_DEADLINE"
LOG_ENV = "SGTV_FUZZ_LOG"
SHRINK_ENV = "SGTV_FUZZ_SHRINK"


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` examples (or $SGTV_FUZZ_EXAMPLES), reproducible, no example database, no timing checks."""
    n = int(os.environ.get(EXAMPLES_ENV) or ci_examples)
    shrink = os.environ.get(SHRINK_ENV) == "1"
    return settings(
        phases=[p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)],
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


class Hang(BaseException):
    """An example outlived its deadline (a BaseException: the CLI's guard must not turn it into `error:`)."""


@contextlib.contextmanager
def deadline(seconds: float | None = None) -> Iterator[None]:
    """Raise `Hang` in the body after `seconds` (default $SGTV_FUZZ_DEADLINE or 60)."""
    seconds = float(os.environ.get(DEADLINE_ENV) or 60) if seconds is None else seconds

    def boom(signum: int, frame: Any) -> None:
        raise Hang(f"ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # a body stuck in native code never sees the alarm: its stacks go to stderr after twice the bound
    faulthandler.dump_traceback_later(2 * seconds, exit=False)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots`: sha256 of files, `dir`, or `link -> target` (a link is not followed)."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = f"link -> {os.readlink(p)}"
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _inside(path: str, top: Path) -> bool:
    return path == str(top) or path.startswith(str(top) + os.sep)


@dataclasses.dataclass
class Outcome:
    """One CLI run: its argv, exit status, stdout and stderr."""

    argv: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"sgtv {' '.join(map(repr, self.argv))} -> {self.rc}\nstdout: {self.out[-1500:]}\nstderr: {self.err[-3000:]}"


def run_cli(
    argv: Sequence[str],
    watch: Sequence[Path],
    out: Path | None = None,
    fmt: str = "hf",
    note: str = "",
    seconds: float | None = None,
    subprocess_s: float | None = None,
) -> Outcome | None:
    """Run `sgtv argv` in-process and assert the fuzz property (module doc); OUT = `out`, written as `fmt`.

    With $SGTV_FUZZ_LOG set, a failure is appended to that file instead of raised
    (a long run then lists every failing example, not only the first). `note`
    (what the example's input is) goes into the failure message; `seconds`
    bounds the run (default $SGTV_FUZZ_DEADLINE or 60); `subprocess_s`: run it
    in a subprocess killed after that many seconds instead.
    """
    try:
        return _run_cli(argv, watch, out, fmt, seconds, subprocess_s)
    except AssertionError as e:
        msg = f"{e}\ninput: {note[:4000]}" if note else str(e)
        log = os.environ.get(LOG_ENV)
        if not log:
            raise AssertionError(msg) from e
        with open(log, "a") as f:
            f.write(f"=== {msg}\n")
        return None


def _in_process(argv: list[str], seconds: float | None) -> Outcome:
    o, e = io.StringIO(), io.StringIO()
    rc: Any
    try:
        with deadline(seconds), contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(argv)
    except SystemExit as x:  # argparse
        rc = x.code
    except BaseException as x:  # noqa: BLE001 - a traceback or a hang is the finding
        tb = "".join(traceback.format_exception(x))
        raise AssertionError(f"sgtv {argv!r} raised instead of exiting:\n{tb}\nstderr: {e.getvalue()[-2000:]}") from x
    return Outcome(argv, rc, o.getvalue(), e.getvalue())


def _in_subprocess(argv: list[str], seconds: float) -> Outcome:
    """`python -m sgtv_jax.cli argv` (for what may block in native code: a multi-host handshake)."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "sgtv_jax.cli", *argv], capture_output=True, text=True, timeout=seconds
        )
    except subprocess.TimeoutExpired as x:
        raise AssertionError(f"sgtv {argv!r} ran longer than {seconds} s; stderr: {str(x.stderr)[-2000:]}") from None
    return Outcome(argv, p.returncode, p.stdout, p.stderr)


def _run_cli(
    argv: Sequence[str],
    watch: Sequence[Path],
    out: Path | None,
    fmt: str,
    seconds: float | None,
    subprocess_s: float | None = None,
) -> Outcome:
    argv = [str(a) for a in argv]
    watch = list(watch) + ([Path(_PRIVATE_TMP[0])] if _PRIVATE_TMP else [])
    before = snapshot(*watch)
    res = _in_process(argv, seconds) if not subprocess_s else _in_subprocess(argv, subprocess_s)
    rc = res.rc
    assert rc in (0, 2), f"exit status not 0 or 2: {res}"
    assert "Traceback" not in res.err, f"a traceback: {res}"
    if rc == 2:
        lines = [ln for ln in res.err.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error:"), f"last stderr line does not start with 'error:': {res}"
    elif out is not None:
        try:
            assert_loadable(out, fmt, res)
        except AssertionError:
            raise
        except Exception as x:  # noqa: BLE001 - an output transformers cannot read is the finding
            raise AssertionError(f"exit 0 but OUT does not load ({type(x).__name__}: {str(x)[:1500]}): {res}") from x
    after = snapshot(*watch)
    # a successful run may create OUT's missing parent folders (nothing else outside OUT)
    parents = {str(p) for p in out.parents} if out is not None and rc == 0 else set()
    changed = sorted(
        p
        for p in before.keys() | after.keys()
        if before.get(p) != after.get(p)
        and not (out is not None and _inside(p, out))
        and not (p in parents and p not in before and after.get(p) == "dir")
    )
    assert not changed, f"changed or new outside OUT: {changed[:10]}\n{res}"
    return res


def assert_loadable(out: Path, fmt: str, res: Outcome) -> None:
    """OUT is a model: Orbax (its sidecar and state) or HF (AutoConfig loads, every safetensors file reads)."""
    from safetensors import safe_open

    assert out.is_dir(), f"exit 0 without OUT: {res}"
    if fmt == "orbax":
        json.loads((out / "sgtv_model.json").read_text())
        assert (out / "state").is_dir(), res
        return
    if fmt == "adapter":
        json.loads((out / "adapter_config.json").read_text())
        files = [out / "adapter_model.safetensors"]
    else:
        files = sorted(out.glob("*.safetensors"))
        index = out / "model.safetensors.index.json"
        if index.is_file():
            assert {out / f for f in json.loads(index.read_text())["weight_map"].values()} == set(files), res
        if (out / "adapter").is_dir():
            assert_loadable(out / "adapter", "adapter", res)
    assert files, f"no safetensors in OUT: {res}"
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as s:
            for k in s.keys():
                shapes[k] = s.get_tensor(k).shape
    if fmt == "hf":
        _fits_transformers(out, shapes, res)


def _fits_transformers(out: Path, shapes: dict[str, tuple[int, ...]], res: Outcome) -> None:
    """transformers builds OUT's model from its config.json (on the meta device: no memory) and every
    saved tensor has the shape the model expects; what is not saved is the tied head only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(out))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {k: (s, want.get(k)) for k, s in shapes.items() if want.get(k) != tuple(s)}
    assert not wrong, f"tensors that do not fit the config (saved, expected): {dict(list(wrong.items())[:5])}: {res}"
    missing = set(want) - set(shapes) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert not missing, f"tensors the config needs and OUT lacks: {sorted(missing)[:5]}: {res}"


# --------------------------------------------------------------------------- inputs


@contextlib.contextmanager
def make_world(root: Path) -> Iterator[dict]:
    """The tiny LLaMA family, a LoRA adapter of ft0, a narrower model; a private temp dir; a work dir."""
    fam = root / "fam"
    paths = H.make_family(fam, "llama")
    narrow = fam / "narrow"
    _narrow_model(narrow, fam / "tokenizer")
    with private_tmp(root / "tmp"):
        run_cli(["extract-lora", paths["fts"][0], paths["base"], fam / "adapter", "--rank", "2"], [root / "tmp"])
        (root / "work").mkdir()
        yield {"root": root, "fam": fam, "base": paths["base"], "fts": paths["fts"], "narrow": narrow}


def _narrow_model(dst: Path, tokdir: Path) -> None:
    """A LLaMA of hidden size 16 (the family's is 32): its tensors fit no other model's."""
    import torch
    import transformers

    cfg = H.tiny_config("llama", 300)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 16, 32, 2, 1
    torch.manual_seed(3)
    H.save_model(transformers.AutoModelForCausalLM.from_config(cfg).eval(), dst, tokdir)


class Example:
    """One example's folder under the work dir (removed afterwards), with `watch` = everything the run must keep."""

    def __init__(self, world: dict, seconds: float | None = None) -> None:
        self.world = world
        self.seconds = seconds
        self.dir = Path(tempfile.mkdtemp(dir=world["root"] / "work"))
        self.watch = [world["fam"], self.dir]
        self.note = ""

    def __enter__(self) -> Example:
        return self

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, argv: list[Any], out: Path | None = None, fmt: str = "hf"):
        return run_cli(argv, self.watch, out, fmt, self.note, self.seconds)


# --------------------------------------------------------------------------- values


class Raw(str):
    """YAML text written verbatim as a value (`1e400`, `!!binary ...`, `2001-12-14`): see `dump_yaml`."""


RAW_YAML = [
    "1e400",
    "1.0e+400",
    "-1.0e+400",
    "!!float 1e400",
    ".inf",
    "-.inf",
    ".nan",
    "1" + "0" * 400,
    "-1" + "0" * 400,
    "0." + "0" * 400 + "1",
    "0x7fffffffffffffffffff",
    "0o777",
    "1_000",
    "+1",
    "-0",
    "1:30",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [{a: 1}, {b: 2}]",
    "!!pairs [{a: 1}, {a: 2}]",
    "yes",
    "off",
    "~",
    "''",
    '"\\0"',
    '"\\uFFFF"',
    "!!str 0.5",
    "[]",
    "{}",
]
"""Scalars whose YAML text matters (a Python value could not be dumped as this text)."""

HUGE_INT = 10**400
NUMBERS = [0, 1, 2, -1, 3, 0.5, -0.5, 0.0, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, 1e30]
NUMBERS += [2**31, 2**53 + 1, 2**63, 2**64, HUGE_INT, -HUGE_INT, math.inf, -math.inf, math.nan]
STRINGS = ["", " ", "0.5", "1e400", "-1", "inf", "nan", "true", "null", "x" * 100_000, "\u00e9\u4e2d", "a\x00b"]
STRINGS += ["../../../etc/passwd", "/dev/null", "/", "~", "256MiB", "1e400MB", "infGB", "-1GB", "0B", "{{ x }}"]


def numbers_st() -> st.SearchStrategy:
    """Numbers at the edges (0, negatives, 10**400, inf, nan, ...), more often than arbitrary ones."""
    edge = st.sampled_from(NUMBERS)
    return st.one_of(edge, edge, st.integers(), st.floats())


HUGE = [HUGE_INT, -HUGE_INT, Raw("1e400"), Raw("1.0e+400"), Raw("1" + "0" * 400), "infGB", "1e400MB", 10**9, 2**63]
"""Values of the numbers guard being built on branch h-b: beyond float range, sizes of inf, endless iterations."""


def tame(v: Any) -> bool:
    """Whether `v` holds none of `HUGE` (ints beyond float range, inf / 1e400 sizes, 401-digit YAML numbers)."""
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) < 2**1000
    if isinstance(v, str):
        return v not in HUGE and not (isinstance(v, Raw) and v.lstrip("-").isdigit() and len(v) > 300)
    if isinstance(v, dict):
        return all(tame(k) and tame(x) for k, x in v.items())
    if isinstance(v, list):
        return all(tame(x) for x in v)
    return True


def scalars_st() -> st.SearchStrategy:
    """Any scalar: edge numbers, strings, booleans, None, verbatim YAML."""
    return st.one_of(
        numbers_st(),
        st.sampled_from(STRINGS),
        st.text(max_size=12),
        st.booleans(),
        st.none(),
        st.sampled_from(RAW_YAML).map(Raw),
    )


def values_st() -> st.SearchStrategy:
    """Scalars, and small lists / mappings of them (wrong nesting)."""
    keys = st.one_of(st.sampled_from(["value", "filter", "model", "data", "x"]), st.text(max_size=6))
    return st.recursive(
        scalars_st(),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=3),
        max_leaves=6,
    )


def dump_yaml(raw: Any) -> str:
    """YAML text of `raw`, every `Raw` value written verbatim (via a placeholder replaced after dumping)."""
    import yaml

    subs: dict[str, str] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, Raw):
            key = f"RAW_PLACEHOLDER_{len(subs)}"
            subs[key] = str(v)
            return key
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    text = yaml.safe_dump(walk(raw), sort_keys=False, allow_unicode=False, width=10**6)
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


_PRIVATE_TMP: list[Path] = []


@contextlib.contextmanager
def private_tmp(path: Path) -> Iterator[Path]:
    """Make `path` the temporary directory (tempfile and $TMPDIR) in the body: `run_cli` watches it."""
    path.mkdir(parents=True, exist_ok=True)
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(path), str(path)
    _PRIVATE_TMP.insert(0, path)
    try:
        yield path
    finally:
        _PRIVATE_TMP.remove(path)
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
