"""`report.html` (issue 24): one self-contained page per merge, checked in a real headless browser.

A tiny calibrated merge writes `merge_report.json` and `report.html`; Debian's
Chromium renders the page (`--dump-dom`, `--screenshot`) and the tests check
the rendered DOM against the JSON: every section, one SVG marker per report row
in each plotted series, the markers' heights ordered as the values are, the
per-tensor table in report order. `sgtv report OUT` renders the same bytes
again (also in a fresh process). The browser tests skip only when chromium is
absent and SGTV_REQUIRE_CHROMIUM is unset (CI sets it: .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from convert.atomic import write_file_atomic
from sgtv_jax.cli import main
from sgtv_jax.pipeline.report_html import HTML_FILE, render_html
from tests.helpers import tiny_models as H

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["summary", "skipped", "errors", "densities", "stages", "mesh", "config", "layers", "other"]
WINDOW = (1200, 2000)
VOID = {"meta", "link", "br", "img", "input", "hr", "wbr", "col", "area", "base", "source"}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A calibrated TIES + SparseGPT merge of the tiny LLaMA family (two models), through the CLI."""
    root = tmp_path_factory.mktemp("report")
    paths = H.make_family(root, "llama")
    cfg = root / "merge.yaml"
    cfg.write_text(yaml.safe_dump(H.config_dict(paths, root)))
    out = root / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")  # module scope, asked for before `merged`: a skip comes before the merge
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("SGTV_REQUIRE_CHROMIUM"):
            pytest.fail("SGTV_REQUIRE_CHROMIUM is set but chromium is not on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (SGTV_REQUIRE_CHROMIUM=1 makes this a failure)")
    return path


def browse(chromium: str, profile: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (file://), no network services, a private profile."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
        page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


class Dom(HTMLParser):
    """Elements as (tag, attrs, ids of the enclosing elements); text as (text, enclosing ids)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.elements: list[tuple[str, dict, list[str]]] = []
        self.texts: list[tuple[str, list[str]]] = []
        self.feed(text)

    def ids(self) -> list[str]:
        return [i for i in self.stack if i]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a, self.ids()))
        if tag not in VOID:
            self.stack.append(a.get("id"))

    def handle_endtag(self, tag):
        if tag not in VOID:
            self.stack.pop()

    def handle_data(self, data):
        if data.strip():
            self.texts.append((data.strip(), self.ids()))

    def markers(self, gid: str) -> np.ndarray:
        """`[n, 2]` x, y of the marker `<use>`s of the series whose SVG group is `gid`."""
        xy = [(float(a["x"]), float(a["y"])) for t, a, ids in self.elements if t == "use" and gid in ids]
        return np.asarray(xy).reshape(-1, 2)

    def cells(self, section: str) -> list[str]:
        return [t for t, ids in self.texts if section in ids]


def assert_ordered_like(y_svg: np.ndarray, values: list[float]) -> None:
    """SVG y grows downward: a clearly larger value sits clearly higher (smaller y)."""
    v = np.log(np.asarray(values))
    for i in range(len(v)):
        for j in range(len(v)):
            if v[i] > v[j] + 1e-3:
                assert y_svg[i] < y_svg[j], (i, j, values[i], values[j])


def test_rendered_page_shows_the_report(chromium, merged, tmp_path):
    rep = json.loads((merged / "merge_report.json").read_text())
    dom = Dom(browse(chromium, tmp_path / "profile", merged / HTML_FILE, "--dump-dom").stdout)
    assert [a["id"] for t, a, _ in dom.elements if t == "section"] == SECTIONS
    svgs = [ids for t, _, ids in dom.elements if t == "svg"]
    assert [ids[-1] for ids in svgs] == ["errors-plot", "densities-plot", "stages-plot"]
    calibrated = [r for r in rep["layers"] if r["trim_error"] is not None]
    assert len(calibrated) == 3 * 7  # every linear layer of the 3 blocks
    for t in range(2):  # one marker per calibrated layer and task, heights ordered as the errors
        xy = dom.markers(f"errors-trim-{t}")
        assert xy.shape == (len(calibrated), 2) and np.all(np.diff(xy[:, 0]) > 0)
        assert_ordered_like(xy[:, 1], [r["trim_error"][t] for r in calibrated])
    xy = dom.markers("errors-merge")
    assert xy.shape == (len(calibrated), 2)
    assert_ordered_like(xy[:, 1], [r["merge_error"] for r in calibrated])
    for t in range(2):
        assert dom.markers(f"densities-kept-{t}").shape == (len(rep["layers"]), 2)
    bars = {ids[-1] for t, _, ids in dom.elements if t == "path" and ids and ids[-1].startswith("stages-")}
    assert bars == {f"stages-{s}" for s in rep["stages_s"]}
    table = dom.cells("layers")  # the per-tensor table: every tensor, in report order
    names = [c for c in table if c in {r["name"] for r in rep["layers"]}]
    assert names == [r["name"] for r in rep["layers"]]
    assert ", ".join(f"{e:.4g}" for e in calibrated[0]["trim_error"]) in table
    assert "nothing was refused, skipped or fallen back" in dom.cells("skipped")
    assert rep["config"]["merge_method"] in " ".join(dom.cells("config"))

    shot = tmp_path / "page.png"
    browse(
        chromium,
        tmp_path / "profile",
        merged / HTML_FILE,
        f"--screenshot={shot}",
        "--window-size={},{}".format(*WINDOW),
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == WINDOW
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == WINDOW[::-1]
    assert 0.01 < np.mean(np.any(pixels < 0.9, axis=-1)) < 0.9  # drawn: neither blank nor filled


def test_sgtv_report_rewrites_the_same_bytes(merged, tmp_path, capsys):
    page = (merged / HTML_FILE).read_bytes()  # as the merge wrote it, from its final report
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(merged / "merge_report.json", copy / "merge_report.json")
    assert main(["report", str(copy)]) == 0
    assert str(copy / HTML_FILE) in capsys.readouterr().out
    assert (copy / HTML_FILE).read_bytes() == page
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    (copy / HTML_FILE).unlink()
    res = subprocess.run([sys.executable, "-m", "sgtv_jax.cli", "report", str(copy)], env=env, capture_output=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (copy / HTML_FILE).read_bytes() == page  # another process, another hash seed: the same page
    assert sorted(p.name for p in copy.iterdir()) == ["merge_report.json", HTML_FILE]  # nothing half-written left


def _corrupt(d: Path) -> None:
    (d / "merge_report.json").write_text('{"config": {"merge_method": "ties"}, "layers": [')


CORRUPT = {
    "truncated JSON": (_corrupt, "not valid JSON"),
    "not UTF-8": (lambda d: (d / "merge_report.json").write_bytes(b'{"config": "\xff"}'), "not UTF-8"),
    "a list": (lambda d: (d / "merge_report.json").write_text("[1, 2]"), "not a merge report"),
    "layers not a list": (lambda d: (d / "merge_report.json").write_text('{"layers": 5}'), "layers: must be"),
    "a bad row": (
        lambda d: (d / "merge_report.json").write_text('{"layers": [{"name": "w", "trim_error": "x"}]}'),
        "layers[0].trim_error",
    ),
    "stages not seconds": (lambda d: (d / "merge_report.json").write_text('{"stages_s": {"a": "b"}}'), "stages_s"),
    "no report": (lambda d: None, "not found"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_sgtv_report_refuses_a_missing_or_corrupt_report(tmp_path, capsys, case):
    make, what = CORRUPT[case]
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["report", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(out / "merge_report.json") in last and what in last, last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no page, nothing changed


def test_sgtv_report_names_a_missing_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "nope") in last
    assert not (tmp_path / "nope").exists()


def test_page_is_self_contained_and_escapes_what_it_shows(merged):
    rep = json.loads((merged / "merge_report.json").read_text())
    evil = '<script>alert("x")</script>'
    rep["config"]["models"][0]["model"] = evil
    rep["layers"][0]["name"] = evil
    text = render_html(rep)
    assert "<script" not in text and "&lt;script&gt;" in text
    dom = Dom(text)
    assert not [t for t, _, _ in dom.elements if t in {"script", "link", "img", "iframe", "object", "embed"}]
    refs = [v for _, a, _ in dom.elements for k, v in a.items() if k in {"src", "href", "xlink:href"}]
    assert refs and all(v.startswith("#") for v in refs)  # only references inside the page (SVG markers, clips)
    urls = {k for _, a, _ in dom.elements for k, v in a.items() if v and "://" in v}
    assert urls == {"xmlns", "xmlns:xlink"}  # SVG namespace names only: nothing to fetch
    assert "url(http" not in text and "@import" not in text


def test_page_lists_what_was_skipped_and_plots_zero_errors(merged):
    rep = json.loads((merged / "merge_report.json").read_text())
    rows = rep["layers"]
    calibrated = [r for r in rows if r["trim_error"] is not None]
    calibrated[0]["trim_error"][0] = 0.0  # density 1: no error, still one marker
    calibrated[1]["hessian_fallback"] = [False, True]
    calibrated[1]["hessian_tokens"] = [40, 3]
    rows[0]["trim"] = "unchanged"
    rep.update(
        calibration_unused=True,
        not_streamed=[{"name": "model.embed_tokens.weight", "why": "della draws per row"}],
        tensor_rules=[{"tensor": "lm_head.weight", "rule": "taken from the base", "detail": "ft1 lacks it"}],
        adamerging={"coefficients": [[0.5, 0.25]]},
    )
    dom = Dom(render_html(rep))
    skipped = " ".join(dom.cells("skipped"))
    for words in (
        "calibration data was given",
        "model.embed_tokens.weight: over the memory budget, merged whole (della draws per row)",
        "lm_head.weight: taken from the base (ft1 lacks it)",
        f"{calibrated[1]['name']}: {rep['config']['models'][1]['model']}'s Hessian saw 3 routed tokens",
        f"copied from the base: 1: {rows[0]['name']}",
    ):
        assert words in skipped, words
    assert dom.markers("errors-trim-0").shape == (len(calibrated), 2)
    assert '"coefficients"' in " ".join(dom.cells("other"))  # a key no section shows is still on the page

    for r in rows:  # a merge without calibration data
        r["trim_error"] = r["merge_error"] = None
    rep["mesh"] = None
    dom = Dom(render_html(rep))
    assert "no calibration data: no reconstruction errors" in dom.cells("errors")
    assert [ids[-1] for t, _, ids in dom.elements if t == "svg"] == ["densities-plot", "stages-plot"]


def test_write_file_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    page = write_file_atomic(tmp_path / HTML_FILE, b"old")

    def broken(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_file_atomic(page, b"new")
    assert page.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [HTML_FILE]
