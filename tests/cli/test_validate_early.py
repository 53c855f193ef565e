"""Validate before working: what configs and headers tell is refused by `sgtv check` and before any tensor is merged.

Every case runs `sgtv_jax.cli.main` in-process: exit status 2, a message naming
the culprit (source, field, key or flag) and both values where there are two,
no input byte changed (sha256 of every file under the inputs), and no OUT.
The models: the example's qwen3 family (hidden size 64, 4 layers,
`examples/make_tiny_family.py`) and the test helpers' qwen3 family (hidden
size 32, 3 layers, 128 positions).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from sgtv_jax.cli import main
from sgtv_jax.pipeline.config import parse_config
from tests.cli.test_bad_inputs import _digests
from tests.helpers import tiny_models as H

ROOT = Path(__file__).resolve().parents[2]


def _make_tiny_family():
    spec = importlib.util.spec_from_file_location("make_tiny_family", ROOT / "examples" / "make_tiny_family.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fams(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    wide = _make_tiny_family().make_family("qwen3", root / "w64")  # base, ft_a, ft_b, calibration
    narrow = H.make_family(root / "w32", "qwen3")  # base, fts, hidden 32
    # a 32-wide model whose config.json claims the 64-wide one's fields: only its tensors tell
    liar = root / "liar"
    shutil.copytree(narrow["base"], liar)
    (liar / "config.json").write_text((wide["base"] / "config.json").read_text())
    (root / "own.txt").write_text(H.TEXT)
    return {"root": root, "wide": wide, "narrow": narrow, "liar": liar}


class Runner:
    """Writes a config under `tmp`, runs the CLI, checks exit status, message, input bytes and OUT."""

    def __init__(self, fams, tmp: Path, capsys) -> None:
        self.fams, self.tmp, self.capsys = fams, tmp, capsys
        self.out = tmp / "out"

    def yaml(self, raw: dict, name: str = "m.yaml") -> str:
        p = self.tmp / name
        p.write_text(yaml.safe_dump(raw))
        return str(p)

    def run(self, argv: list[str], *, code: int = 2, names: tuple[str, ...] = (), absent: tuple[str, ...] = ()) -> str:
        roots = (self.fams["root"], self.tmp)
        before = _digests(*roots, skip=("out",))
        self.capsys.readouterr()
        rc = main(argv)
        out, err = self.capsys.readouterr()
        assert rc == code, (rc, out, err)
        if code == 2:
            assert err.startswith("error: ") and "Traceback" not in err, err
            assert not self.out.exists(), "OUT was created by a refused merge"
            assert not list(self.tmp.glob(".out.partial*")), "a partial output was left"
        for n in names:
            assert n in err, (n, err)
        for n in absent:
            assert n not in err, (n, err)
        assert _digests(*roots, skip=("out",)) == before, "an input file changed"
        return err

    def both(self, cfg: str, *, names: tuple[str, ...], absent: tuple[str, ...] = (), flags: tuple = ()) -> None:
        """`sgtv check` and `sgtv merge` refuse `cfg` with the same message."""
        a = self.run(["check", cfg, *flags], names=names, absent=absent)
        b = self.run(["merge", cfg, str(self.out), "--quiet", *flags], names=names, absent=absent)
        assert a == b


@pytest.fixture
def run(fams, tmp_path, capsys):
    return Runner(fams, tmp_path, capsys)


def _slices(*sources: tuple[Path, list[int]], **over) -> dict:
    raw = {
        "slices": [{"sources": [{"model": str(m), "layer_range": r}]} for m, r in sources],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    raw.update(over)
    return raw


# --------------------------------------------------------------------------- 1. slices of different widths


def test_slices_of_a_64_and_a_32_wide_model_are_refused_naming_source_field_and_values(run, fams):
    w, n = fams["wide"]["base"], fams["narrow"]["base"]
    cfg = run.yaml(_slices((w, [0, 2]), (n, [1, 3])))
    run.both(
        cfg,
        names=(
            f"slices[1].sources[0] ({n})",
            "hidden_size = 32",
            "hidden_size = 64",
            "head_dim = 8",
            "intermediate_size = 64",
            "vocab_size = 300",  # the narrow model gives the final norm and head
            f"base_model ({w})",
        ),
    )


def test_slices_whose_tensors_contradict_their_config_are_refused_by_shape(run, fams):
    """A config that matches says nothing about the tensors: their header shapes are checked against the layout."""
    w = fams["wide"]["base"]
    cfg = run.yaml(_slices((w, [0, 2]), (fams["liar"], [1, 3])))
    run.both(cfg, names=("output tensor 'model.layers.2.", f"{fams['liar']} model.layers.1.", "[64, 64]"))


def test_slices_of_one_family_still_pass_and_load(run, fams):
    """The checks refuse nothing a consistent frankenmerge needs (6 layers from a 4-layer family)."""
    f = fams["wide"]
    cfg = run.yaml(_slices((f["ft_a"], [0, 3]), (f["ft_b"], [1, 4]), base_model=str(f["base"])))
    run.run(["check", cfg], code=0)
    run.run(["merge", cfg, str(run.out), "--quiet"], code=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(run.out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 64


# --------------------------------------------------------------------------- 2. --lora on slices


def test_lora_of_a_frankenmerge_with_more_layers_is_refused_before_work(run, fams):
    f = fams["wide"]
    cfg = run.yaml(_slices((f["ft_a"], [0, 3]), (f["ft_b"], [1, 4])))
    run.both(
        cfg,
        flags=("--lora", "2"),
        names=("--lora 2", f"base model ({f['ft_a']}", "base_model", "slices", "6 layers", "model.layers.4."),
        absent=(".partial",),
    )
    # without --lora the same config merges
    run.run(["check", cfg], code=0)


def test_lora_of_a_same_layout_frankenmerge_is_extracted_against_base_model(run, fams):
    f = fams["wide"]
    cfg = run.yaml(_slices((f["ft_a"], [0, 2]), (f["ft_b"], [2, 4]), base_model=str(f["base"])))
    run.run(["check", cfg, "--lora", "2"], code=0)
    run.run(["merge", cfg, str(run.out), "--quiet", "--lora", "2"], code=0)
    adapter = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(f["base"]) and adapter["r"] == 2


# --------------------------------------------------------------------------- 3. per-model calibration inherits


def _calibrated(fams, **over) -> dict:
    paths = fams["narrow"]
    raw = H.config_dict(paths, fams["root"] / "w32", hessian_source="per_task")
    raw["calibration"] = {"data": str(fams["root"] / "w32" / "calib.txt"), "nsamples": 5, "seqlen": 24, "seed": 3}
    raw["models"][0]["calibration"] = {"data": str(fams["root"] / "own.txt")}
    raw.update(over)
    return raw


def test_per_model_calibration_inherits_the_top_level_keys_it_does_not_set(fams):
    raw = _calibrated(fams)
    raw["models"][1]["calibration"] = {"data": str(fams["root"] / "own.txt"), "seqlen": 16, "text_field": "body"}
    cfg = parse_config(raw)
    own, other = cfg.calibration_for(0), cfg.calibration_for(1)
    assert (own.nsamples, own.seqlen, own.seed, own.text_field) == (5, 24, 3, "text")
    assert own.data == (str(fams["root"] / "own.txt"),)
    assert (other.nsamples, other.seqlen, other.seed, other.text_field) == (5, 16, 3, "body")


def test_own_calibration_within_the_models_positions_passes_check(run, fams):
    """`calibration: {data: own.txt}` under a top-level seqlen within the model's 128 positions: was refused (512)."""
    run.run(["check", run.yaml(_calibrated(fams))], code=0)


@pytest.mark.parametrize(
    "where, names, absent",
    [
        ("top", ("m.yaml", "calibration.seqlen 400 exceeds the model's maximum of 128"), ("512", "models[0]")),
        ("own", ("m.yaml", "models[0].calibration.seqlen 400 exceeds"), ("512",)),
        ("none", ("models[0].calibration.seqlen 512", "the default"), ()),
    ],
)
def test_seqlen_errors_cite_the_key_the_user_wrote(run, fams, where, names, absent):
    raw = _calibrated(fams)
    if where == "top":
        raw["calibration"]["seqlen"] = 400
    elif where == "own":
        raw["models"][0]["calibration"]["seqlen"] = 400
    else:
        del raw["calibration"]["seqlen"]
    run.both(run.yaml(raw), names=names, absent=absent)


# --------------------------------------------------------------------------- 4. per-model calibration unused


@pytest.mark.parametrize("source", ["merged", "base", None])
def test_per_model_calibration_under_a_shared_hessian_source_is_refused(run, fams, source):
    raw = _calibrated(fams, hessian_source=source)
    if source is None:
        del raw["hessian_source"]  # the default, merged
    run.both(
        run.yaml(raw),
        names=("m.yaml", "models[0].calibration", f"hessian_source: {source or 'merged'}", "per_task"),
    )
