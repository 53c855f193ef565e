"""The declared merge-config schema (`sgtv_jax.pipeline.config.schema`) and `sgtv schema`.

* the committed docs/sgtv-merge.schema.json is exactly what `sgtv schema` prints (it cannot drift);
* it is a valid draft 2020-12 schema, and every config under examples/configs/ and every
  ```yaml block of README.md and docs/*.md validates against it (`jsonschema`, independent of pydantic);
* method parameters are per merge_method, ranges and defaults come from the method table;
* what `parse_config` refuses through the declared model reads as before: the key's dotted
  path, a "did you mean", every problem at once; defaults in `MergeConfig` are the schema's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from sgtv_jax.merge.specs import METHOD_SPECS, PER_MODEL_PARAMS
from sgtv_jax.pipeline.config import ConfigError, MergeConfig, parse_config
from sgtv_jax.pipeline.config import schema as S
from sgtv_jax.pipeline.config.cli import schema_text

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "sgtv-merge.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(schema_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _documented_configs() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for f in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        out.append((str(f.relative_to(ROOT)), yaml.safe_load(f.read_text())))
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(re.finditer(r"```yaml\n(.*?)```", md.read_text(), re.S)):
            out.append((f"{md.relative_to(ROOT)} yaml block {i}", yaml.safe_load(m.group(1))))
    # `sgtv moe` configs (they list `experts`) are another format, checked by their own loader in test_readme.
    return [(name, doc) for name, doc in out if not (isinstance(doc, dict) and "experts" in doc)]


def test_committed_schema_is_sgtv_schema_output():
    """`sgtv schema` (the installed command line, a subprocess) prints the committed file byte for byte."""
    run = subprocess.run(
        [sys.executable, "-m", "sgtv_jax.cli", "schema"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == schema_text()
    assert COMMITTED.read_text() == run.stdout, "regenerate: sgtv schema > docs/sgtv-merge.schema.json"


def test_documented_configs_validate(validator):
    docs = _documented_configs()
    assert len(docs) >= 6 + 5  # the example configs and README's blocks at least
    for name, doc in docs:
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: {errors}"


def test_method_parameters_per_method(validator):
    base = {"base_model": "b", "models": ["a"]}
    assert validator.is_valid({**base, "merge_method": "slerp", "parameters": {"t": 0.5}})
    assert not validator.is_valid({**base, "merge_method": "ties", "parameters": {"t": 0.5}})  # slerp's, not ties'
    assert not validator.is_valid({**base, "merge_method": "karcher", "parameters": {"max_iter": 0}})
    assert validator.is_valid({**base, "merge_method": "ties", "parameters": {"int8_mask": True}})
    rules = [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]
    assert validator.is_valid({**base, "merge_method": "ties", "parameters": {"density": rules}})
    bad_density = {**base, "merge_method": "ties", "models": [{"model": "a", "parameters": {"density": 1.5}}]}
    assert not validator.is_valid(bad_density)
    assert not validator.is_valid({**base, "merge_method": "ties", "blocksize": 0})
    assert not validator.is_valid({**base, "merge_method": "tie"})
    assert not validator.is_valid({**base, "merge_method": "ties", "merge_methd": "ties"})


def test_schema_ranges_and_defaults_come_from_the_method_table():
    schema = json.loads(schema_text())
    by_method = {b["if"]["properties"]["merge_method"]["const"]: b["then"] for b in schema["allOf"]}
    assert set(by_method) == set(METHOD_SPECS)
    for name, spec in METHOD_SPECS.items():
        props = by_method[name]["properties"]["parameters"]["properties"]
        own = {ps.name for ps in spec.params}
        for ps in spec.params + tuple(p for p in PER_MODEL_PARAMS if p.name not in own):
            leaf = props[ps.name]["anyOf"][0]
            assert props[ps.name].get("default") == ps.default, (name, ps.name)
            if ps.kind in ("int", "float") and ps.lo is not None:
                assert leaf.get("exclusiveMinimum" if ps.lo_open else "minimum") == ps.lo, (name, ps.name)
            if ps.kind == "choice":
                assert leaf["enum"] == list(ps.choices)


def test_merge_config_defaults_are_the_schema_defaults():
    cfg = parse_config({"merge_method": "ties", "base_model": "b", "models": ["a"]})
    settings = S.Settings()
    for key in ("blocksize", "percdamp", "prunen", "prunem", "refit", "seed", "batch_size", "max_shard_size"):
        assert getattr(cfg, key) == getattr(settings, key) == MergeConfig.__dataclass_fields__[key].default
    assert cfg.memory_budget == 256 << 20 and cfg.devices == "all" and cfg.hessian_accumulation == "float32"


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return str(e.value).split("\n  - ")[1:] or [str(e.value).split(": ", 1)[1]]


def test_nested_unknown_keys_and_values_all_at_once():
    """Every level's unknown key with its suggestion and every bad leaf, in one error, each naming its key."""
    raw = {
        "merge_method": "ties",
        "base_model": "b",
        "models": ["a", {"model": "c", "parameters": {"densty": 0.5, "weight": [{"filter": "x"}]}}],
        "calibration": {"data": "d.txt", "nsamples": 0, "txt_field": "x"},
        "tokenizer": {"tokens": {"<p>": {"source": {"kind": "zero", "x": 1}, "force": "yes"}}},
        "devices": 0,
        2: "two",
    }
    got = _problems(raw)
    want = [
        "unknown key 'densty' in models[1].parameters (did you mean 'density'?)",
        "models[1].parameters.weight: filter rule {'filter': 'x'} has no 'value'",
        "calibration.nsamples must be an integer >= 1, got 0",
        "unknown key 'txt_field' in calibration (did you mean 'text_field'?)",
        "unknown key 'x' in tokenizer.tokens['<p>'].source (known keys: kind)",
        "tokenizer.tokens['<p>'].force must be true or false, got 'yes'",
        "devices must be 'all' or a positive integer, got 0",
        "unknown key 2 in the config (known keys: ",
    ]
    for w in want:
        assert any(p.startswith(w) for p in got), (w, got)


def test_dtype_null_is_no_dtype():
    """`dtype: null` (as before the schema): the model's own dtype, no problem."""
    cfg = parse_config({"merge_method": "ties", "base_model": "b", "models": ["a"], "dtype": None})
    assert cfg.dtype is None
