"""Every code block of README.md and docs/*.md (and every config in examples/configs/) runs against the code.

Blocks are found by their fences, one test per block, so a new section or docs
page is covered without touching this file:

* ``yaml``: written verbatim into a folder where the paths it names exist (tiny
  LLaMA checkpoints, small calibration files), read by ``load_config`` and
  checked by ``check_config``: an unknown key or a bad value fails;
* ``python``: executed, in a folder holding a tiny Hugging Face model as
  ``hf_dir``, with tiny values for the names it uses without defining
  (``FREE_NAMES``): a renamed function or argument fails;
* ``bash``: each command parsed, not run: ``sgtv`` / ``python -m convert`` lines
  by the real argument parsers, ``pip install -e`` extras against
  pyproject.toml, ``python FILE`` / ``bash FILE`` against the file. (CI runs the first block
  verbatim, see .ci/run.)

Unlabelled blocks are output and are not run; any other language fails until it
has a runner here. A python or bash block that cannot run is marked in the
page, right before its fence, with ``<!-- readme-test: skip (reason) -->``;
a yaml block never is: the models it names are built for it (as many layers as
its slices take; a fine-tune whose tokenizer has the tokens the config takes
from it).

Besides the blocks: the README stays a landing page (at most ``README_MAX_LINES``
lines, its Layout naming every module), and the docs' generated YAML reference
describes exactly the keys the config parser accepts.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import importlib.util
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sgtv_jax.moe.config import load_moe_config
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import load_config
from tests.helpers import tiny_models as helpers

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250  # a landing page; the rest lives in docs/
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*\Z")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text, and a skip reason if marked."""

    where: str
    index: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def id(self) -> str:
        lines = [ln.strip() for ln in self.code.splitlines() if ln.strip()]
        first = next((ln for ln in lines if not ln.startswith("#")), lines[0] if lines else "")
        return f"{self.where}#{self.index}-{self.lang}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', first)[:40]}"


def readme_blocks(text: str, where: str = "README.md") -> list[Block]:
    """Every labelled fenced block of `text`, in order (unlabelled ones are output)."""
    out = []
    for i, m in enumerate(FENCE.finditer(text)):
        lang = m.group(1).strip().split(" ")[0].lower()
        if not lang:
            continue
        marker = SKIP.search(text, 0, m.start())
        out.append(Block(where, i, lang, m.group(2), marker.group("reason").strip() if marker else None))
    return out


def example_configs() -> list[Block]:
    return [
        Block(f"examples/configs/{p.name}", 0, "yaml", p.read_text())
        for p in sorted((ROOT / "examples" / "configs").glob("*.yaml"))
    ]


def docs_blocks() -> list[Block]:
    """The blocks of every docs page (docs/*.md, in name order)."""
    return [b for p in sorted(DOCS.glob("*.md")) for b in readme_blocks(p.read_text(), f"docs/{p.name}")]


BLOCKS = readme_blocks(README.read_text()) + docs_blocks() + example_configs()


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Any]:
    """Tiny random LLaMA base + two fine-tunes (HF dirs with a tokenizer), 1024 positions."""
    root = tmp_path_factory.mktemp("readme-models")
    paths = helpers.make_family(root, "llama")
    for d in [paths["base"], *paths["fts"]]:
        # The README's configs ask for 512-token windows; RoPE weights do not depend on this.
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    return paths


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory) -> Callable[[int], dict[str, Any]]:
    """Tiny LLaMA base + two fine-tunes with `n` layers (for slices' layer ranges), built once per `n`."""
    made: dict[int, dict[str, Any]] = {}

    def build(n: int) -> dict[str, Any]:
        if n not in made:
            made[n] = helpers.make_family(tmp_path_factory.mktemp(f"readme-{n}-layers"), "llama", layers=n)
        return made[n]

    return build


def _layers_needed(raw: dict[str, Any]) -> int:
    """The deepest layer a config's slices take (0 without slices)."""
    stops = [
        int(src["layer_range"][1])
        for sl in raw.get("slices") or []
        for src in sl.get("sources") or []
        if isinstance(src, dict) and isinstance(src.get("layer_range"), list) and len(src["layer_range"]) == 2
    ]
    return max(stops, default=0)


def _token_sources(raw: dict[str, Any]) -> dict[str, list[str]]:
    """{model as written: tokens the config's `tokenizer.tokens` take from it}."""
    tokens = (raw.get("tokenizer") or {}).get("tokens") or {} if isinstance(raw.get("tokenizer"), dict) else {}
    out: dict[str, list[str]] = {}
    for tok, spec in tokens.items():
        src = spec.get("source") if isinstance(spec, dict) else None
        if isinstance(src, str):
            out.setdefault(src, []).append(tok)
    return out


def _widened(src: Path, dst: Path, tokens: list[str]) -> None:
    """A fine-tune `src` whose tokenizer adds `tokens`, its embeddings and head resized to match, at `dst`."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))


def _paths_of(raw: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(model paths in order, base last; [(calibration file, text_field)]) named by a raw config."""
    models = [m["model"] for m in raw.get("models") or [] if isinstance(m, dict) and "model" in m]
    models += [e["source_model"] for e in raw.get("experts") or [] if isinstance(e, dict) and "source_model" in e]
    models += [src["model"] for sl in raw.get("slices") or [] for src in sl.get("sources") or [] if "model" in src]
    calibs = [raw.get("calibration")] + [
        m.get("calibration") for m in (raw.get("models") or []) + (raw.get("experts") or []) if isinstance(m, dict)
    ]
    files = []
    for c in calibs:
        c = {"data": c} if isinstance(c, (str, list)) else c
        if isinstance(c, dict):
            data = c.get("data")
            for f in [data] if isinstance(data, str) else data or []:
                files.append((f, c.get("text_field", "text")))
    return models + ([raw["base_model"]] if "base_model" in raw else []), files


def _place(folder: Path, rel: str, make: Callable[[Path], None]) -> None:
    if Path(rel).is_absolute():
        pytest.fail(f"example config names an absolute path {rel!r}; use one relative to the config")
    dst = folder / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        make(dst)


# --------------------------------------------------------------------------- python blocks

WIDTH = 576  # the Quick start's layer width: it calls sg.hessian_init(576)
ROWS, COLS, TOKENS = 8, 32, 12


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _gram(width: int, seed: int) -> np.ndarray:
    x = _x(4 * width, width, seed=seed)
    return (2.0 / x.shape[0]) * x.T @ x


# Values for the names README snippets use without defining them (the reader's own data).
FREE_NAMES: dict[str, Callable[[Path], Any]] = {
    "batches": lambda ws: [_x(2, TOKENS, WIDTH, seed=s) for s in (1, 2)],
    "mask": lambda ws: np.tile(np.arange(TOKENS) < TOKENS - 3, (2, 1)).astype(np.int32),
    "delta": lambda ws: 0.01 * _x(ROWS, WIDTH, seed=3),
    "stack": lambda ws: 0.01 * _x(2, ROWS, WIDTH, seed=4),
    "rows": lambda ws: ROWS,
    "cols": lambda ws: COLS,
    "inputs": lambda ws: _x(2, TOKENS, COLS, seed=5),
    "task_vector": lambda ws: 0.01 * _x(ROWS, COLS, seed=6),
    "weights": lambda ws: [1.0, 1.0],
    "base_params": lambda ws: {"layer.weight": _x(ROWS, COLS, seed=7)},
    "ft_params": lambda ws: [
        {"layer.weight": _x(ROWS, COLS, seed=7) + 0.01 * _x(ROWS, COLS, seed=8 + t)} for t in range(2)
    ],
    "densities": lambda ws: [0.5, 0.5],
    "hessians": lambda ws: {"layer.weight": _gram(COLS, 10)},
    "H": lambda ws: _gram(WIDTH, 11),  # matches `delta` / `stack` ([..., WIDTH])
    # The convert snippet's replacement for one tensor of `hf_dir` (the tiny LLaMA).
    "new_w": lambda ws: np.zeros(_up_proj_shape(ws / "hf_dir"), np.float32),
}


def _up_proj_shape(hf_dir: Path) -> tuple[int, int]:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return cfg["intermediate_size"], cfg["hidden_size"]


def free_names(code: str) -> set[str]:
    """Names `code` reads but never binds (nor imports), builtins excluded."""
    tree = ast.parse(code)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound - set(dir(builtins))


# --------------------------------------------------------------------------- bash blocks


class _Parsed(Exception):
    """Raised instead of running a command once its arguments parsed."""


def _parse_only(main: Callable[[list[str]], Any], argv: list[str], monkeypatch) -> None:
    """Run `main(argv)` up to its top-level `parse_args`, which must accept `argv` (or print help)."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, *a, **k):
        real(self, *a, **k)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        try:
            main(argv)
        except _Parsed:
            return
        except SystemExit as e:  # --help exits 0; a bad argument exits 2
            assert e.code == 0, f"arguments {argv} rejected"
            return
    pytest.fail(f"{argv}: the command line ran instead of stopping after parsing")


def check_command(words: list[str], monkeypatch) -> None:
    """Check one command line of a bash block against the code (nothing is run)."""
    from convert.cli import main as convert_main
    from sgtv_jax.cli import main as sgtv_main

    if words[0] == "sgtv":
        _parse_only(sgtv_main, words[1:], monkeypatch)
    elif words[:3] == ["python", "-m", "convert"]:
        _parse_only(convert_main, words[3:], monkeypatch)
    elif words[:2] == ["python", "-m"] and words[2] == "pytest":
        assert (ROOT / "tests").is_dir()
    elif words[:2] == ["python", "-m"]:  # a module of this repository that runs as a script
        spec = importlib.util.find_spec(words[2])
        assert spec is not None and spec.origin, f"python -m {words[2]}: no such module"
        assert "__main__" in Path(spec.origin).read_text(), f"python -m {words[2]}: the module does not run as a script"
    elif words[:3] == ["pip", "install", "-e"] and len(words) == 4:
        spec = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", words[3])
        assert spec, f"pip install -e {words[3]}: not the repository root"
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
        for extra in (spec.group(1) or "").split(",") if spec.group(1) else []:
            assert extra in extras, f"pip install -e {words[3]}: pyproject.toml has no extra {extra!r}"
    elif words[:2] == ["mkdocs", "build"]:
        assert (ROOT / "mkdocs.yml").is_file(), "mkdocs build: no mkdocs.yml at the repository root"
        assert set(words[2:]) <= {"--strict"}, f"{shlex.join(words)}: CI builds with `mkdocs build --strict` only"
    elif words[0] == "python" and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{words[1]}: no such file in the repository"
    elif words[0] == "bash" and words[1].endswith(".sh"):
        assert (ROOT / words[1]).is_file(), f"{words[1]}: no such script in the repository"
    else:
        pytest.fail(
            f"no checker for the command {shlex.join(words)!r}: add one in tests/cli/test_readme.py, "
            f"or mark the block with <!-- readme-test: skip (reason) -->"
        )


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block(block: Block, family, deep_family, tmp_path, monkeypatch):
    if block.skip is not None:
        assert block.lang != "yaml", f"{block.id}: a yaml block is never skipped; remove its marker"
        pytest.skip(f"marked in {block.where}: {block.skip}")
    ws = tmp_path / "work"
    ws.mkdir()
    monkeypatch.chdir(ws)
    if block.lang == "yaml":
        raw = yaml.safe_load(block.code)
        models, files = _paths_of(raw)
        need = _layers_needed(raw)
        fam = family if need <= helpers.LAYERS else deep_family(need)
        widen = _token_sources(raw)
        for i, rel in enumerate(models):
            src = fam["base"] if rel == raw.get("base_model") else fam["fts"][i % len(fam["fts"])]
            if rel in widen:
                _place(ws, rel, lambda dst, src=src, rel=rel: _widened(src, dst, widen[rel]))
            else:
                _place(ws, rel, lambda dst, src=src: os.symlink(src, dst, target_is_directory=True))
        for rel, field in files:
            rows = [s.strip() + "." for s in helpers.TEXT.split(".") if s.strip()]
            body = "".join(json.dumps({field: r}) + "\n" for r in rows) if rel.endswith(".jsonl") else helpers.TEXT
            _place(ws, rel, lambda dst, body=body: dst.write_text(body))
        if "experts" in raw:  # a `sgtv moe` config
            (ws / "moe.yaml").write_text(block.code)
            assert load_moe_config(ws / "moe.yaml").experts
            return
        (ws / "merge.yaml").write_text(block.code)
        cfg = load_config(ws / "merge.yaml")
        if "base_model" in raw:
            assert Path(cfg.base_model).resolve() == fam["base"].resolve()
        check_config(cfg)
    elif block.lang == "python":
        os.symlink(family["base"], ws / "hf_dir", target_is_directory=True)
        missing = free_names(block.code) - set(FREE_NAMES)
        assert not missing, f"the block uses {sorted(missing)} without defining them: add tiny values to FREE_NAMES"
        ns = {name: FREE_NAMES[name](ws) for name in free_names(block.code)}
        exec(compile(block.code, f"{block.where} block {block.index}", "exec"), ns)  # noqa: S102
    elif block.lang == "bash":
        for line in block.code.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                command = words[:cut]
                if ">" in command:  # a redirection is the shell's, not the command's
                    command = command[: command.index(">")]
                check_command(command, monkeypatch)
                words = words[cut + 1 :]
    else:
        pytest.fail(
            f"no runner for ```{block.lang} blocks: add one in tests/cli/test_readme.py, "
            f"or mark the block with <!-- readme-test: skip (reason) -->"
        )


def test_harness_finds_every_block_and_marker():
    """The fence and marker rules, on a README-like text (so a block is never silently dropped)."""
    text = (
        "intro\n```bash\nsgtv demo\n```\n\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\nx = 1\n```\n"
        "```\noutput\n```\n```yaml\nmodels: []\n```\n"
    )
    got = readme_blocks(text)
    assert [(b.lang, b.skip) for b in got] == [("bash", None), ("python", "needs a GPU"), ("yaml", None)]
    assert got[1].code == "x = 1\n" and got[2].id.startswith("README.md#3-yaml-models")
    assert {b.lang for b in BLOCKS} >= {"bash", "python", "yaml"}
    assert not [b.id for b in BLOCKS if b.lang == "yaml" and b.skip is not None], "a yaml block is skipped"
    assert sum(b.where.startswith("examples/") for b in BLOCKS) == len(list((ROOT / "examples/configs").glob("*.yaml")))
    assert free_names("import numpy as np\nfor x in xs:\n    y = np.f(x, w)\nprint(y, H)") == {"xs", "w", "H"}


# --------------------------------------------------------------------------- the README as a landing page


def _section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


def test_readme_is_a_landing_page():
    """At most README_MAX_LINES lines; its first bash block starts with the demo and test commands (.ci/run)."""
    text = README.read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details into docs/"
    first = next(b for b in readme_blocks(text) if b.lang == "bash")
    commands = [ln for ln in first.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[:2] == ["pip install -e . && sgtv demo", 'pip install -e ".[test]" && python -m pytest -q']


def _layout_files(layout: str) -> set[str]:
    """Files a Layout table names: `dir/file.py`, then bare `file.py` in the same cell inherit that `dir/`."""
    named: set[str] = set()
    for row in layout.splitlines():
        if not row.startswith("| `"):
            continue
        folder = ""
        for word in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if "/" in word.rstrip("/"):
                folder = word.rsplit("/", 1)[0] + "/"
                named.add(word)
            else:
                named.add(folder + word)
    return named


def test_readme_layout_names_every_module():
    """Every module of the packages and every example script has a row in the README's Layout."""
    named = _layout_files(_section(README.read_text(), "Layout"))
    files = [
        p.relative_to(ROOT).as_posix()
        for pkg in ("sgtv_jax", "convert", "examples")
        for p in (ROOT / pkg).rglob("*")
        if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts and "configs" not in p.parts
    ]
    missing = sorted(f for f in files if f not in named)
    assert not missing, f"README.md's Layout does not name {missing}"
    stale = sorted(f for f in named if f.endswith((".py", ".sh")) and not (ROOT / f).is_file())
    assert not stale, f"README.md's Layout names files that do not exist: {stale}"
    assert _layout_files("| `a/b.py`, `c.py` | x |\n| `d.py` | y |") == {"a/b.py", "a/c.py", "d.py"}


def _anchors(md: str) -> set[str]:
    """The heading ids mkdocs' toc gives a page (its default slugify), code blocks skipped."""
    text = FENCE.sub("", md)
    out = set()
    for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\s-]", "", h.replace("`", "")).strip().lower()
        out.add(re.sub(r"[-\s]+", "-", slug))
    return out


def test_readme_links_reach_the_docs():
    """Every relative link of the README names a file that exists, and each `page.md#anchor` a heading there."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README.read_text())
    assert {p for p, _ in links if p.startswith("docs/")} >= {
        f"docs/{n}.md" for n in ("getting-started", "merging", "yaml-reference", "methods", "api", "scaling")
    }
    for path, anchor in links:
        if "://" in path:
            continue
        assert (ROOT / path).is_file(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in _anchors((ROOT / path).read_text()), f"README.md links to {path}#{anchor}: no such heading"


def test_readme_links_every_docs_page():
    """Every page of the site's nav is one click from the README (so any section is two)."""

    def pages(nav: Any) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        items = nav.values() if isinstance(nav, dict) else nav
        return [p for item in items for p in pages(item)]

    nav = pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    linked = set(re.findall(r"\]\(docs/([^)#\s]+)", README.read_text()))
    missing = sorted(p for p in nav if p != "index.md" and p not in linked)
    assert not missing, f"README.md does not link these docs pages: {missing}"
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == on_disk, "mkdocs.yml's nav and docs/*.md differ"


def _reference() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "_gen" / "reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_reference_is_generated_from_the_code():
    """The YAML reference describes exactly the keys the parser accepts, and lists every method `sgtv methods` does."""
    import sgtv_jax

    ref = _reference()
    assert ref.undocumented() == []
    page = ref.expand((DOCS / "yaml-reference.md").read_text())
    assert "<!-- sgtv:" not in page
    from sgtv_jax.pipeline.config import TOP_KEYS

    for key in TOP_KEYS:
        assert f"| `{key}` |" in page
    for name in sgtv_jax.available_methods():
        assert re.search(rf"^{re.escape(name)}: ", page, re.M), f"method {name} missing from the YAML reference"
    with pytest.raises(ValueError, match="unknown generated section"):
        ref.expand("<!-- sgtv: nothing -->")
