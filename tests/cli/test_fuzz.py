"""Property-based fuzzing of `sgtv check` / `sgtv merge` configs and of the subcommands' flags.

Every generated input must end in exit 0 with a loadable model or exit 2 with
the last stderr line starting `error:`; never a traceback, another status or a
hang; inputs byte-identical; nothing written outside OUT (`tests.helpers.fuzz`).

Configs start valid for a method drawn from the real method table
(`sgtv_jax.merge.specs.METHOD_SPECS`, parameters drawn from their ParamSpecs),
then take up to three mutations: a top-level key, a method or per-model
parameter set to an edge value (0, negative, 10**400, `1e400`, inf, nan, huge
strings, YAML timestamps / binary / sets), a gradient or filter rules of such
values, unknown keys, wrong nesting, deleted keys, odd model paths, slices,
calibration, tokenizer and chat-template keys. Flag values: tests/cli/test_fuzz_flags.py.

CI runs a few examples per test (derandomized: the same examples every run,
about 90 s for all tests/cli/test_fuzz*.py on two cores). Maintainers run longer with
`SGTV_FUZZ_EXAMPLES=500 python -m pytest -q tests/cli/test_fuzz*.py`
(`SGTV_FUZZ_DEADLINE` bounds each example, default 60 s).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtv_jax.merge.specs import LEARNED_TRIMS, METHOD_SPECS, PER_MODEL_PARAMS, ParamSpec
from sgtv_jax.pipeline.config import TOP_KEYS
from tests.helpers.fuzz import (
    HUGE,
    Example,
    Raw,
    dump_yaml,
    fuzz_settings,
    make_world,
    numbers_st,
    scalars_st,
    tame,
    values_st,
)

DATA_FREE_TRIMS = ("magnitude", "random", "magprune", "breadcrumbs")
CALIBRATED = sorted(n for n, s in METHOD_SPECS.items() if s.needs_grams or s.learns_weights)
DATA_FREE = sorted(n for n in METHOD_SPECS if n not in CALIBRATED)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with make_world(tmp_path_factory.mktemp("fuzz")) as w:
        yield w


# --------------------------------------------------------------------------- configs


def _valid_value(ps: ParamSpec) -> st.SearchStrategy:
    """A value inside `ps`'s declared range (small: iteration counts stay cheap)."""
    if ps.kind == "bool":
        return st.booleans()
    if ps.kind == "choice":
        return st.sampled_from(ps.choices)
    lo = -2.0 if ps.lo is None else float(ps.lo)
    if ps.kind == "int":
        return st.integers(int(lo), int(lo) + 2)
    hi = lo + 2.0 if ps.hi is None or ps.hi == float("inf") else float(ps.hi)
    if ps.name == "learning_rate":
        lo = 1e-6  # documented > 0 (the table's bound is 0)
    if ps.name == "init":
        lo, hi = 0.0, 1.0  # adamerging: in [0, 1] while clip is true
    return st.floats(lo, min(hi, lo + 2.0), allow_nan=False)


@st.composite
def valid_configs(draw, fam: dict, calibrated: bool = False) -> dict:
    """A config `sgtv check` accepts, for a method drawn from the method table.

    `calibrated`: a method that reads calibration data, or a calibration trim
    (each merge compiles forward passes: seconds); else a data-free merge.
    """
    name = draw(st.sampled_from(CALIBRATED + ["ties", "dare_ties"] if calibrated else DATA_FREE))
    spec = METHOD_SPECS[name]
    most = 1 if spec.max_models == 1 else 2
    n = draw(st.integers(max(spec.min_models, 1), most))
    trim = None
    if spec.learns_weights:
        trim = draw(st.sampled_from((None,) + LEARNED_TRIMS))
    elif spec.trims and calibrated and not spec.needs_grams:
        trim = draw(st.sampled_from(("sparsegpt", "wanda")))
    elif spec.trims:
        trim = draw(st.sampled_from((None, spec.default_trim) + DATA_FREE_TRIMS))
    models = []
    for t in range(n):
        p: dict[str, Any] = {}
        for ps in PER_MODEL_PARAMS:
            if ps.name == "weight" and spec.learns_weights:
                continue
            if ps.name != "weight" and not (spec.trims and (trim or spec.default_trim)):
                continue
            if draw(st.booleans()):
                p[ps.name] = draw(_valid_value(ps))
        models.append({"model": str(fam["fts"][t]), "parameters": p})
    params = {ps.name: draw(_valid_value(ps)) for ps in spec.params if ps.required or draw(st.booleans())}
    raw: dict[str, Any] = {
        "models": models,
        "merge_method": name,
        "base_model": str(fam["base"]),
        "parameters": params,
        "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
    }
    if trim is not None:
        raw["trim"] = trim
    if calibrated:
        raw["calibration"] = {"data": str(fam["fam"] / "calib.txt"), "nsamples": 2, "seqlen": 8}
        raw["batch_size"] = 2
    if "steps" in spec.param_names:  # adamerging, wudi: a few learning steps (defaults 100, 300)
        params["steps"] = draw(st.integers(1, 2))
    return raw


def _number_spec() -> st.SearchStrategy:
    """A parameter spec of edge values: plain, a gradient, or filter rules."""
    leaf = st.one_of(numbers_st(), scalars_st())
    return st.one_of(
        leaf,
        st.lists(numbers_st(), min_size=0, max_size=4),
        st.lists(
            st.fixed_dictionaries({"value": leaf}, optional={"filter": st.sampled_from(["mlp", "self_attn", "", 3])}),
            min_size=1,
            max_size=3,
        ),
    )


def _model_paths(fam: dict) -> st.SearchStrategy:
    f = fam["fam"]
    return st.sampled_from(
        [
            str(f / "nope"),
            "",
            str(f / "calib.txt"),
            str(fam["narrow"]),
            str(f / "tokenizer"),
            str(fam["base"]) + "+" + str(f / "adapter"),
            str(fam["fts"][0]) + "+" + str(f / "adapter"),
            str(f / "adapter"),
            str(f / "ft0" / ".." / "ft1"),
            str(fam["base"]),
            "relative/nowhere",
            str(f / "ft0" / "model.safetensors"),
            "x" * 5000,
            "/dev/null",
        ]
    )


ITERATIONS = ("max_iter", "steps")
MUTATIONS = ("top", "param", "model_param", "unknown", "nest", "delete", "model", "calibration", "slices")


@st.composite
def mutations(
    draw, raw: dict, fam: dict, kinds: tuple[str, ...] = MUTATIONS, huge: bool = False, narrow: bool = False
) -> list[str]:
    """Apply up to three mutations of `kinds` to `raw` in place; the list of what was done.

    `huge`: the numbers drawn include `HUGE` (ints beyond float range, sizes of
    inf, iteration counts of 10**9: the guard built on branch h-b); else none of them.
    `narrow`: slices may take layers of the narrower model (width checks: branch h-d).
    """
    spec = METHOD_SPECS[raw["merge_method"]]
    done = []

    def pick(strategy: st.SearchStrategy, key: str = "") -> st.SearchStrategy:
        if huge:
            return st.one_of(strategy, st.sampled_from(HUGE), st.lists(st.sampled_from(HUGE), min_size=1, max_size=2))
        if key in ITERATIONS:  # 10**9 iterations run for as long as you let them (h-b bounds them)
            return st.one_of(st.integers(-3, 3), st.sampled_from(["x", None, 1.5, True, [1, 2]]))
        return strategy.filter(tame)

    names = [ps.name for ps in spec.params] + [ps.name for ps in PER_MODEL_PARAMS] + ["bogus", "lambda", "t"]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "top":
            key = draw(st.sampled_from(TOP_KEYS))
            raw[key] = draw(pick(values_st(), key))
        elif kind == "param":
            key = draw(st.sampled_from(names))
            if not isinstance(raw.get("parameters"), dict):
                raw["parameters"] = {}
            raw["parameters"][key] = draw(pick(_number_spec(), key))
        elif kind == "model_param" and isinstance(raw.get("models"), list) and raw["models"]:
            m = raw["models"][draw(st.integers(0, len(raw["models"]) - 1))]
            if isinstance(m, dict):
                key = draw(st.sampled_from([ps.name for ps in PER_MODEL_PARAMS] + ["bogus"]))
                m.setdefault("parameters", {})
                if isinstance(m["parameters"], dict):
                    m["parameters"][key] = draw(pick(_number_spec(), key))
        elif kind == "unknown":
            where = draw(st.sampled_from(["top", "parameters", "model", "calibration"]))
            key = draw(st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["seqlen", "density", "model"])))
            target = raw if where == "top" else raw.get(where) if where != "model" else (raw.get("models") or [{}])[0]
            if isinstance(target, dict):
                target[key] = draw(pick(scalars_st()))
        elif kind == "nest":
            key = draw(st.sampled_from(sorted(raw)))
            wrap = draw(st.sampled_from(["list", "value", "items", "str"]))
            v = raw[key]
            raw[key] = (
                [v]
                if wrap == "list"
                else {"value": v}
                if wrap == "value"
                else list(v.items())
                if isinstance(v, dict)
                else Raw(f"'{v!s:.50}'")
            )
        elif kind == "delete" and raw:
            raw.pop(draw(st.sampled_from(sorted(raw))))
        elif kind == "model" and isinstance(raw.get("models"), list) and raw["models"]:
            i = draw(st.integers(0, len(raw["models"]) - 1))
            if isinstance(raw["models"][i], dict):
                raw["models"][i]["model"] = draw(st.one_of(_model_paths(fam), pick(scalars_st())))
        elif kind == "calibration":
            cal = raw.get("calibration")
            if not isinstance(cal, dict):
                cal = raw["calibration"] = {"data": str(fam["fam"] / "calib.txt"), "nsamples": 2, "seqlen": 8}
            key = draw(st.sampled_from(["data", "nsamples", "seqlen", "seed", "text_field"]))
            cal[key] = draw(st.one_of(pick(values_st()), _model_paths(fam)))
        elif kind == "slices":
            raw.pop("models", None)
            rng = st.one_of(st.integers(-1, 4), pick(numbers_st()))
            srcs = [str(fam["fts"][0]), str(fam["fts"][1]), str(fam["base"])] + [str(fam["narrow"])] * narrow
            raw["slices"] = [
                {
                    "sources": [
                        {"model": draw(st.sampled_from(srcs)), "layer_range": [draw(rng), draw(rng)]}
                        for _ in range(draw(st.integers(1, 2)))
                    ]
                }
                for _ in range(draw(st.integers(1, 2)))
            ]
        done.append(kind)
    return done


def _check_and_merge(ex: Example, raw: Any) -> None:
    cfg = ex.dir / "m.yaml"
    cfg.write_text(dump_yaml(raw))
    ex.note = cfg.read_text()
    ex.run(["check", cfg, "--force"])
    ex.run(["merge", cfg, ex.dir / "out", "--quiet", "--force"], out=ex.dir / "out")


@fuzz_settings(25)
@given(data=st.data())
def test_fuzz_config(world, data):
    raw = data.draw(valid_configs(world))
    data.draw(mutations(raw, world))
    with Example(world) as ex:
        _check_and_merge(ex, raw)


@fuzz_settings(8)
@given(data=st.data())
def test_fuzz_config_huge_numbers(world, data):
    """Numbers beyond float range, `infGB` / `1e400MB` sizes and 10**9 iterations in every numeric key."""
    raw = data.draw(valid_configs(world))
    data.draw(mutations(raw, world, ("top", "param", "model_param", "calibration"), huge=True))
    with Example(world, seconds=20) as ex:
        _check_and_merge(ex, raw)


@st.composite
def slice_configs(draw, fam: dict) -> dict:
    """Slices of valid layer ranges over the family and the narrower model (passthrough or merged)."""
    method = draw(st.sampled_from(["passthrough", "passthrough", "linear", "task_arithmetic"]))
    models = [str(fam["base"]), str(fam["fts"][0]), str(fam["fts"][1]), str(fam["narrow"])]
    slices = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.integers(0, 2))
        span = [a, draw(st.integers(a + 1, 3))]
        n = 1 if method == "passthrough" else 2
        slices.append({"sources": [{"model": draw(st.sampled_from(models)), "layer_range": span} for _ in range(n)]})
    raw: dict[str, Any] = {"slices": slices, "merge_method": method, "dtype": "float32"}
    if method != "passthrough":
        raw["base_model"] = str(fam["base"])
    return raw


@fuzz_settings(10)
@given(data=st.data(), lora=st.sampled_from([None, "2"]))
def test_fuzz_slices(world, data, lora):
    """Slices that may join layers of models of different widths; `--lora` on the frankenmerge."""
    raw = data.draw(slice_configs(world))
    with Example(world) as ex:
        cfg = ex.dir / "m.yaml"
        cfg.write_text(dump_yaml(raw))
        ex.note = cfg.read_text()
        ex.run(["check", cfg, "--force"])
        argv = ["merge", cfg, ex.dir / "out", "--quiet", "--force"] + ([] if lora is None else ["--lora", lora])
        ex.run(argv, out=ex.dir / "out")


CHAT_TEMPLATES = ["auto", "chatml", "llama3", "{{ messages }}" * 3, "{% for m in messages %}" * 2, "x" * 100_000]


@fuzz_settings(5)
@given(
    data=st.data(),
    source=st.one_of(st.sampled_from(["base", "union", "ft0", "narrow", "tokenizer", "adapter"]), scalars_st()),
    template=st.one_of(st.none(), st.sampled_from(CHAT_TEMPLATES), scalars_st()),
    block=st.booleans(),
)
def test_fuzz_tokenizer_keys(world, data, source, template, block):
    """tokenizer_source / the tokenizer block and chat_template set to model folders, templates and edge values."""
    raw = data.draw(valid_configs(world))
    fam = world["fam"]
    src = str(fam / source) if source in ("ft0", "narrow", "tokenizer", "adapter") else source
    if block:
        raw["tokenizer"] = {"source": src, "tokens": data.draw(st.sampled_from([{}, {"<eos>": {"source": src}}]))}
    else:
        raw["tokenizer_source"] = src
    if template is not None:
        raw["chat_template"] = template
    with Example(world) as ex:
        _check_and_merge(ex, raw)


@fuzz_settings(3)
@given(data=st.data())
def test_fuzz_config_calibrated(world, data):
    """Methods and trims that read calibration data, with their parameters and calibration keys mutated."""
    raw = data.draw(valid_configs(world, calibrated=True))
    data.draw(mutations(raw, world, ("param", "model_param", "calibration")))
    with Example(world) as ex:
        _check_and_merge(ex, raw)
