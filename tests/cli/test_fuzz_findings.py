"""What the fuzz tests (tests/cli/test_fuzz*.py) found, each as one fixed, deterministic case.

- a config with several problems ended stderr with a `  - problem` line, not `error:`;
- a bad flag ended stderr with `sgtv eval: error: ...` (argparse's format);
- a config.json that transformers refuses (a field of the wrong type, heads that
  do not divide the hidden size, an unknown dtype) gave a traceback in
  `sgtv convert` / `sgtv eval`;
- a base whose config.json does not describe its tensors (hidden_size 0, a
  head_dim that does not fit) was merged by name into an output that
  transformers cannot load (exit 0); now `sgtv check` and `sgtv merge` refuse it;
- a GGUF without tokenizer.ggml.model: a ValueError traceback from transformers' loader.
"""

from __future__ import annotations

import json
import shutil

import pytest

from sgtv_jax.cli import main
from tests.helpers import tiny_models as H
from tests.helpers.fuzz import run_cli


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("found")
    return root, H.make_family(root, "llama")


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _broken(tmp_path, src, **values):
    """A copy of model folder `src` whose config.json has `values` (None: the key removed)."""
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in values.items():
        cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _yaml(tmp_path, base, fts) -> str:
    raw = {
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fts],
        "merge_method": "task_arithmetic",
        "base_model": str(base),
    }
    p = tmp_path / "m.yaml"
    p.write_text(json.dumps(raw))  # JSON is YAML
    return str(p)


def test_config_problems_end_with_an_error_line(fam, tmp_path, capsys):
    root, paths = fam
    raw = json.loads(_yaml(tmp_path, paths["base"], paths["fts"]) and (tmp_path / "m.yaml").read_text())
    raw["bogus"] = 1
    raw["models"][0]["parameters"]["weight"] = "heavy"
    (tmp_path / "m.yaml").write_text(json.dumps(raw))
    assert main(["check", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'm.yaml'}: invalid merge config:\n  - ")
    assert _last_line(err) == f"error: {tmp_path / 'm.yaml'}: invalid merge config (2 problems listed above)"


@pytest.mark.parametrize(
    "argv, last",
    [
        (["eval", "x", "--seqlen", "q"], "error: sgtv eval: argument --seqlen: invalid int value: 'q'"),
        (["merge", "only.yaml"], "error: sgtv merge: the following arguments are required: out"),
        (["convert", "a", "b", "--dtype", "fp8"], "error: sgtv convert: argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_bad_flags_end_with_an_error_line(argv, last, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and _last_line(err).startswith(last), err


@pytest.mark.parametrize(
    "values, names",
    [
        # sizes and counts fail our own check first (convert.model_config), the rest transformers' own
        ({"num_attention_heads": -594}, ("num_attention_heads must be an integer >= 1, got -594",)),
        ({"vocab_size": 1.5e15}, ("vocab_size must be an integer >= 1, got 1500000000000000.0",)),
        ({"dtype": "llama"}, ("transformers refuses", "llama")),
        ({"rope_parameters": False}, ("transformers refuses", "'rope_parameters'")),
        ({"hidden_act": "bogus"}, ("hidden_act 'bogus' is not an activation transformers knows",)),
    ],
)
@pytest.mark.parametrize("command", ["convert", "eval"])
def test_config_json_transformers_refuses(fam, tmp_path, values, names, command):
    root, paths = fam
    broken = _broken(tmp_path, paths["fts"][1], **values)
    if command == "convert":
        argv, out = ["convert", broken, tmp_path / "conv", "-q"], tmp_path / "conv"
    else:
        argv, out = ["eval", broken, "--text", root / "calib.txt", "--seqlen", "16"], None
    res = run_cli(argv, [root, tmp_path], out)
    assert res.rc == 2
    for n in (str(broken / "config.json"),) + names:
        assert n in _last_line(res.err), (n, res.err)
    assert not (tmp_path / "conv").exists()


def test_config_json_not_an_object(fam, tmp_path):
    root, paths = fam
    broken = tmp_path / "broken"
    shutil.copytree(paths["fts"][1], broken)
    (broken / "config.json").write_text('"x"')
    res = run_cli(["check", _yaml(tmp_path, paths["base"], [paths["fts"][0], broken])], [root, tmp_path])
    assert res.rc == 2 and f"{broken / 'config.json'}: must hold a JSON object, got a JSON str" in res.err, res.err


@pytest.mark.parametrize(
    "values, names",
    [
        ({"num_attention_heads": -594}, ("num_attention_heads must be an integer >= 1, got -594",)),
        ({"hidden_size": 0}, ("hidden_size must be an integer >= 1, got 0",)),
        ({"head_dim": 36684}, ("self_attn.k_proj.weight' has shape (16, 32) but the config expects (73368, 32)",)),
        ({"num_hidden_layers": 0}, ("num_hidden_layers must be an integer >= 1, got 0",)),
        ({"num_hidden_layers": 1}, ("unexpected tensor 'model.layers.1.",)),
        ({"hidden_act": "bogus"}, ("hidden_act 'bogus' is not an activation",)),
    ],
)
@pytest.mark.parametrize("command", ["check", "merge"])
def test_base_config_that_does_not_fit_its_tensors_is_refused(fam, tmp_path, values, names, command):
    """The output would carry this config.json: transformers could not load the merged model."""
    root, paths = fam
    base = _broken(tmp_path, paths["base"], **values)
    cfg = _yaml(tmp_path, base, paths["fts"])
    out = tmp_path / "out"
    argv = ["check", cfg] if command == "check" else ["merge", cfg, out, "--quiet"]
    res = run_cli(argv, [root, tmp_path], out if command == "merge" else None)
    assert res.rc == 2 and "base_model: " in res.err, res.err
    for n in names:
        assert n in res.err, (n, res.err)
    assert not out.exists()


def test_fine_tune_config_with_impossible_sizes_is_refused(fam, tmp_path):
    """A fine-tune's config.json is not copied into the output, but sizes no model can have are refused
    by name all the same (every config.json is checked on read): the folder is not what it says it is."""
    root, paths = fam
    ft = _broken(tmp_path, paths["fts"][1], hidden_size=0)
    out = tmp_path / "out"
    res = run_cli(
        ["merge", _yaml(tmp_path, paths["base"], [paths["fts"][0], ft]), out, "--quiet"], [root, tmp_path], out
    )
    assert res.rc == 2 and f"{ft / 'config.json'}" in res.err and "hidden_size must be an integer >= 1" in res.err
    assert not out.exists()


def test_gguf_without_tokenizer_model_names_the_file(tmp_path):
    """A GGUF whose tokenizer.ggml.model is missing (e.g. its key's bytes corrupted): transformers' loader
    raised ValueError through `sgtv convert`."""
    from tests.cli.test_fuzz_headers import GGUF_META, write_gguf

    meta = {k: v for k, v in GGUF_META.items() if k != "tokenizer.ggml.model"}
    path = write_gguf(tmp_path / "m.gguf", meta)
    res = run_cli(["convert", path, tmp_path / "out", "-q"], [tmp_path], tmp_path / "out")
    assert res.rc == 2 and f"{path}: transformers cannot build its tokenizer (tokenizer.ggml.model " in res.err
    assert not (tmp_path / "out").exists()
