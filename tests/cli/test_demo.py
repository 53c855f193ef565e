"""`sgtv demo`'s work directory: its merge config resolves from any current directory.

The demo's merge YAML is read by the same loader as `sgtv merge`, which resolves
relative paths against the YAML's own folder; the demo must write them that way
whatever work directory (relative, nested, absolute) and current directory it ran with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sgtv_jax.pipeline import demo
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import load_config
from tests.helpers import tiny_models as H


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return root, H.make_family(root, "llama")


@pytest.mark.parametrize("work", ["sgtv-demo", "runs/a/demo", "ABS"])
def test_demo_config_resolves_from_another_cwd(family, tmp_path, monkeypatch, work):
    root, paths = family
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    out = Path(start / "abs-demo" if work == "ABS" else work)
    out.mkdir(parents=True)
    fts = []
    for name, src in zip(("ft_facts", "ft_logs"), paths["fts"]):  # fine-tunes live in the work dir, as in the demo
        os.symlink(src, out / name)
        fts.append(out / name)
    calib = out / "calibration.txt"
    calib.write_text(H.TEXT)
    config = demo.write_merge_config(out / "merge.yaml", paths["base"], fts, calib, density=0.3)

    raw = yaml.safe_load(config.read_text())
    # What a user copying the folder would want: work-dir files relative to the YAML, the cached base absolute.
    assert [m["model"] for m in raw["models"]] == ["ft_facts", "ft_logs"]
    assert raw["calibration"]["data"] == "calibration.txt"
    assert raw["base_model"] == os.path.abspath(paths["base"])

    monkeypatch.chdir(elsewhere)
    cfg = load_config(start / config if not config.is_absolute() else config)
    assert [Path(m.model).resolve() for m in cfg.models] == [(start / f).resolve() for f in fts]
    assert Path(cfg.base_model).resolve() == paths["base"].resolve()
    assert [Path(d).resolve() for d in cfg.calibration.data] == [(start / calib).resolve()]
    assert cfg.models[0].parameters["density"] == 0.3
    check_config(cfg)  # the checkpoints behind those paths are found and compatible


def test_run_demo_default_work_dir_end_to_end(family, tmp_path, monkeypatch, capsys):
    """The whole demo, with a tiny LLaMA standing in for SmolLM2, in the default relative work dir."""
    root, paths = family
    monkeypatch.setattr(demo, "fetch_smollm2", lambda cache_dir=None: paths["base"])  # the name demo calls
    monkeypatch.setattr(demo, "TOP_BLOCKS", 1)  # the tiny model has 3 blocks
    monkeypatch.chdir(tmp_path)
    rows = demo.run_demo(steps=2)
    out = tmp_path / "sgtv-demo"
    assert (out / "merged" / "merge_report.json").is_file()
    assert set(rows) == {"base", "ft_facts", "ft_logs", "merged (ties+sparsegpt)"}
    for r in rows.values():
        assert 0.0 <= r["facts_em"] <= 1.0 and r["logs_ppl"] > 1.0
    text = capsys.readouterr().out
    assert "facts exact match" in text and "merged (ties+sparsegpt)" in text
    cfg = load_config(out / "merge.yaml")
    assert [Path(m.model).resolve() for m in cfg.models] == [(out / "ft_facts").resolve(), (out / "ft_logs").resolve()]
    # the model card and report name the cached base by its folder name, not by a path of this machine
    meta, block = H.read_card(out / "merged" / "README.md")
    H.assert_hub_card(meta, [paths["base"].name, "ft_facts", "ft_logs"], "ties")
    assert block == {**yaml.safe_load((out / "merge.yaml").read_text()), "base_model": paths["base"].name}
    for f in ("README.md", "merge_report.json"):
        text = (out / "merged" / f).read_text()
        assert str(paths["base"]) not in text and str(root) not in text and str(tmp_path) not in text, f
