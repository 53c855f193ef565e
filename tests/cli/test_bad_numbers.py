"""Numbers from outside (YAML, JSON sidecars, GGUF metadata, CLI flags) go through one guard: `sgtv_jax.numparse`.

The parser against hand-computed cases, then every bad number (one guard, no
traceback) through `sgtv_jax.cli.main` in-process: exit status 2,
one `error:` line naming the key / flag / file, no input byte changed, no
output written (the `Case` of `test_bad_inputs`).
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from sgtv_jax import numparse
from sgtv_jax.merge.specs import KARCHER_MAX_ITER, MAX_LEARNING_STEPS, METHOD_SPECS
from tests.cli.test_bad_inputs import Case, fam  # noqa: F401  (fam: the module-scoped tiny LLaMA family fixture)

HUGE = 10**400  # float(HUGE) raises OverflowError
HUGE_TEXT = "1" + "0" * 400  # the same, as written in a YAML / JSON file


@pytest.fixture
def case(fam, tmp_path, capsys):  # noqa: F811
    return Case(fam, tmp_path, capsys)


def _one_error(case: Case, argv: list[str], *names: str) -> str:
    err = case.run(argv, names=names)
    assert err.strip().count("\n") == 0, err  # one line
    assert len(err) < 600, err  # echoed values are truncated
    return err


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    "value, bounds, why",
    [
        (1, {}, None),
        (True, {}, "must be a number"),
        ("1", {}, "must be a number"),
        (None, {"integer": True}, "must be an integer"),
        (1.0, {"integer": True}, "must be an integer"),
        (float("nan"), {}, "must be finite"),
        (float("-inf"), {}, "must be finite"),
        (HUGE, {}, "is too large (beyond the float range, about 1.8e+308)"),
        (HUGE, {"integer": True}, "is too large (an integer must be within +-9223372036854775807)"),
        (2**63 - 1, {"integer": True}, None),
        (-(2**63), {"integer": True}, "is too large (an integer must be within +-9223372036854775807)"),
        (0, {"integer": True, "lo": 1}, "must be an integer >= 1"),
        (0.0, {"lo": 0, "lo_open": True}, "must be > 0.0"),
        ("x", {"lo": 0, "hi": 1}, "must be a number in [0.0, 1.0]"),
        (2.5, {"integer": True, "lo": 1}, "must be an integer >= 1"),
        (1e-300, {"lo": 0, "lo_open": True}, None),
        (1.5, {"lo": 0, "hi": 1}, "must be in [0.0, 1.0]"),
        (10001, {"integer": True, "lo": 1, "hi": 10_000}, "must be an integer in [1, 10000]"),
        (10_000, {"integer": True, "lo": 1, "hi": 10_000}, None),
        (2.0, {"hi": 1}, "must be <= 1.0"),
        (5, {"lo": 0, "hi": float("inf")}, None),
    ],
)
def test_problem(value, bounds, why):
    assert numparse.problem(value, **bounds) == why


def test_number_keeps_ints_as_ints_and_names_the_key():
    assert type(numparse.number(7, "k", integer=True)) is int
    assert numparse.number(7, "k") == 7.0 and type(numparse.number(7, "k")) is float
    assert type(numparse.number(np.int32(3), "k", integer=True)) is int  # GGUF metadata arrives as numpy scalars
    with pytest.raises(numparse.NumberError, match=r"^r is too large .*, got 1000000000000000.*000$"):
        numparse.number(HUGE, "r", integer=True, lo=1)
    problems: list[str] = []
    assert numparse.collect(float("inf"), "lambda", 1.0, problems) == 1.0
    assert problems == ["lambda must be finite, got inf"]


@pytest.mark.parametrize(
    "value, want",
    [
        ("256MiB", 256 * 2**20),
        ("1.5KB", 1500),
        (" 5GB ", 5 * 10**9),
        ("2gib", 2 * 2**30),
        ("1TB", 10**12),
        ("100B", 100),
        ("4096", 4096),
        (4096, 4096),
        ("1e3KB", 10**6),
    ],
)
def test_size_accepts(value, want):
    assert numparse.size(value, "s") == want


@pytest.mark.parametrize(
    "value, why",
    [
        ("infGB", "must be finite"),
        ("1e400MB", "must be finite"),
        ("nanMB", "must be finite"),
        (float("inf"), "must be finite"),
        ("1e30", "is too large (at most 9223372036854775807 bytes)"),
        (1e30, "is too large (at most 9223372036854775807 bytes)"),
        (HUGE, "is too large (at most 9223372036854775807 bytes)"),
        ("9EiB", "must be a size such as 500MB, 2GB or 1GiB"),
        ("0", "must be a positive size"),
        ("-1KB", "must be a positive size"),
        ("0.1B", "must be a positive size (at least 1 byte)"),
        ("abc", "must be a size such as 500MB, 2GB or 1GiB"),
        (True, "must be a size such as 500MB, 2GB or 1GiB"),
        ([1], "must be a size such as 500MB, 2GB or 1GiB"),
    ],
)
def test_size_refuses(value, why):
    assert numparse.size_problem(value) == (0, why)


def test_show_truncates_huge_values():
    assert len(numparse.show(HUGE)) < 50
    assert numparse.show(10**5000) == "an integer of about 5000 digits"  # repr itself refuses past 4300 digits


def test_iteration_parameters_have_declared_upper_bounds():
    """Every iteration count of every method is bounded, so no config asks for an endless loop."""
    for spec in METHOD_SPECS.values():
        for ps in spec.params:
            if ps.kind == "int":
                assert ps.hi is not None and ps.hi < float("inf"), (spec.name, ps.name)
    assert METHOD_SPECS["karcher"].param("max_iter").hi == KARCHER_MAX_ITER == 10_000
    assert METHOD_SPECS["wudi"].param("steps").hi == METHOD_SPECS["adamerging"].param("steps").hi == MAX_LEARNING_STEPS


# --------------------------------------------------------------------------- YAML


def _check_and_merge(case: Case, text: str, *names: str) -> None:
    """`sgtv check` and `sgtv merge` both refuse, with the same names, and write no output."""
    path = case.yaml(text)
    _one_error(case, ["check", path], *names)
    _one_error(case, ["merge", path, str(case.tmp / "out"), "--quiet"], *names)
    assert not (case.tmp / "out").exists()


def _data_free_yaml(case: Case, method: str, params: str, models: int = 2) -> str:
    ms = "\n".join(f"  - model: {p}" for p in case.paths["fts"][:models])
    return f"models:\n{ms}\nmerge_method: {method}\nbase_model: {case.paths['base']}\nparameters: {params}\n"


def test_slerp_t_as_a_401_digit_integer(case):
    _check_and_merge(
        case, _data_free_yaml(case, "slerp", "{t: " + HUGE_TEXT + "}", models=1), "parameters.t", "too large"
    )


@pytest.mark.parametrize(
    "value, why",
    [
        ("infGB", "must be finite"),
        ("1e400MB", "must be finite"),
        ("1.0e+400", "must be finite"),  # YAML's float: inf
        ("1e30", "is too large"),  # a string for PyYAML (no dot): bytes
        ("1.0e+30", "is too large"),  # a float
        (HUGE_TEXT, "is too large"),
        ("0", "must be a positive size"),
    ],
)
def test_memory_budget(case, value, why):
    text = _data_free_yaml(case, "task_arithmetic", "{}") + f"memory_budget: {value}\n"
    _check_and_merge(case, text, "memory_budget", why)


def test_max_shard_size_in_the_config(case):
    text = _data_free_yaml(case, "task_arithmetic", "{}") + "max_shard_size: infGB\n"
    _check_and_merge(case, text, "max_shard_size must be finite")


@pytest.mark.parametrize("method", ["wudi", "adamerging"])
def test_learning_rate_zero_refused_for_every_method_declaring_it(case, method):
    raw = case.data_free(merge_method=method, parameters={"learning_rate": 0.0})
    if method == "adamerging":
        raw["calibration"] = case.raw()["calibration"]
        for m in raw["models"]:
            m["parameters"].pop("weight")
    _one_error(case, ["check", case.yaml(raw)], "parameters.learning_rate must be > 0.0, got 0.0")


def test_karcher_max_iter_bounded_before_any_work(case):
    text = _data_free_yaml(case, "karcher", "{max_iter: 1000000000, tol: 0}")
    _check_and_merge(case, text, "parameters.max_iter must be an integer in [1, 10000], got 1000000000")


def test_wudi_steps_bounded(case):
    text = _data_free_yaml(case, "wudi", "{steps: 100000000}")
    _check_and_merge(case, text, "parameters.steps must be an integer in [0, 100000]")


def test_integer_key_as_huge_integer(case):
    text = _data_free_yaml(case, "task_arithmetic", "{}") + f"seed: {HUGE_TEXT}\n"
    _check_and_merge(case, text, "seed is too large")


def test_integer_beyond_pythons_conversion_limit(case):
    """PyYAML's int() of a 5000-digit integer raises ValueError: refused naming file and line."""
    text = _data_free_yaml(case, "task_arithmetic", "{}") + "seed: " + "9" * 5000 + "\n"
    _check_and_merge(case, text, "m.yaml:7", "5000 digits")


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
        ("num_attention_heads", "4", "num_attention_heads must be an integer >= 1, got '4'"),
        ("num_key_value_heads", 3, "num_key_value_heads 3 does not divide num_attention_heads 4"),
        ("hidden_size", HUGE, "hidden_size is too large"),
    ],
)
def test_fine_tune_config_json_numbers(case, key, value, why):
    ft = case.tmp / "ft"
    shutil.copytree(case.paths["fts"][0], ft)
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["num_attention_heads"] == 4
    (ft / "config.json").write_text(json.dumps(cfg | {key: value}))
    text = f"models:\n  - model: {ft}\nmerge_method: task_arithmetic\nbase_model: {case.paths['base']}\n"
    _check_and_merge(case, text, "config.json", why)


def test_every_problem_is_listed(case):
    """A config error still lists all problems (one per key), the last line starting with `error:`."""
    text = _data_free_yaml(case, "karcher", "{max_iter: 0}") + "memory_budget: infGB\nseed: -1\n"
    case.capsys.readouterr()
    from sgtv_jax.cli import main

    assert main(["check", case.yaml(text)]) == 2
    err = case.capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for name in ("parameters.max_iter", "memory_budget must be finite", "seed must be an integer >= 0"):
        assert name in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "(3 problems listed above)" in err, err


# --------------------------------------------------------------------------- LoRA (adapter_config.json, --lora)


def _adapter(case: Case, **over) -> str:
    ad = case.tmp / "ad"
    ad.mkdir(exist_ok=True)
    save_file({"x": np.zeros(1, np.float32)}, str(ad / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    text = json.dumps(cfg | {k: "@" + k for k in over})
    for k, v in over.items():  # written as raw JSON numbers (json.dumps cannot write 10**400 as 1e400)
        text = text.replace(f'"@{k}"', v)
    (ad / "adapter_config.json").write_text(text)
    return f"models:\n  - model: {case.paths['base']}+{ad}\nmerge_method: task_arithmetic\nbase_model: {case.paths['base']}\n"


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("r", HUGE_TEXT, "r is too large"),
        ("lora_alpha", HUGE_TEXT, "lora_alpha is too large"),
        ("lora_alpha", "1e400", "lora_alpha must be a number"),  # JSON 1e400 is inf
        ("r", "0", "r must be a positive integer, got 0"),
    ],
)
def test_adapter_config_numbers(case, key, value, why):
    _check_and_merge(case, _adapter(case, **{key: value}), "adapter_config.json", why)


def test_lora_flag_huge(case):
    path = case.yaml(_data_free_yaml(case, "task_arithmetic", "{}"))
    _one_error(case, ["merge", path, str(case.tmp / "out"), "--quiet", "--lora", HUGE_TEXT], "--lora 1000", "too large")
    assert not (case.tmp / "out").exists()


# --------------------------------------------------------------------------- other CLI flags and OUT


def test_eval_seqlen_zero(case):
    _one_error(
        case,
        ["eval", str(case.paths["base"]), "--text", str(case.root / "calib.txt"), "--seqlen", "0"],
        "--seqlen 0: must be an integer >= 1",
    )


@pytest.mark.parametrize("size", ["infGB", "1e400MB", "1e30"])
def test_convert_max_shard_size(case, size):
    _one_error(
        case,
        ["convert", str(case.paths["base"]), str(case.tmp / "out"), "--max-shard-size", size],
        f"--max-shard-size '{size}'",
    )
    assert not (case.tmp / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_dev_null_as_out_is_named_a_device(case, overwrite):
    path = case.yaml(_data_free_yaml(case, "task_arithmetic", "{}"))
    err = _one_error(
        case, ["merge", path, "/dev/null", "--quiet"] + (["--overwrite"] if overwrite else []), "/dev/null"
    )
    assert "is a character device, not a directory" in err and "a file" not in err


# --------------------------------------------------------------------------- Orbax sgtv_model.json


@pytest.fixture(scope="module")
def orbax_dir(fam, tmp_path_factory):  # noqa: F811
    from convert import convert_to_orbax

    out = tmp_path_factory.mktemp("orbax") / "ckpt"
    convert_to_orbax(fam[1]["base"], out)
    return out


def _orbax_variant(case: Case, orbax_dir, text: str):
    d = case.tmp / "orb"
    shutil.copytree(orbax_dir, d)
    (d / "sgtv_model.json").write_text(text)
    return d


def _meta(orbax_dir) -> dict:
    return json.loads((orbax_dir / "sgtv_model.json").read_text())


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda m: "{not json", ("sgtv_model.json", "not valid JSON")),
        (lambda m: "[1, 2]", ("sgtv_model.json", "must hold a JSON object, got a JSON list")),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "hf_config"}), ("hf_config must be a JSON object",)),
        (lambda m: json.dumps(m | {"param_dtype": "int8"}), ("param_dtype must be one of", "'int8'")),
        (
            lambda m: json.dumps(
                m
                | {"model_type": "martian", "hf_config": m["hf_config"] | {"model_type": "martian"}}
                | {"junk": list(range(2000))}
            ),
            ("unsupported architecture 'martian'",),
        ),
        (
            lambda m: json.dumps(m | {"hf_config": m["hf_config"] | {"model_type": ["x" * 10] * 900}}),
            ("sgtv_model.json", "hf_config.model_type must be a string, got ['xxxxxxxxxx'"),
        ),
        (
            lambda m: json.dumps(m | {"hf_config": m["hf_config"] | {"num_attention_heads": 0}}),
            ("num_attention_heads must be an integer >= 1, got 0",),
        ),
        (
            lambda m: json.dumps(m | {"hf_config": m["hf_config"] | {"hidden_size": HUGE}}),
            ("hidden_size is too large",),
        ),
    ],
)
def test_orbax_to_hf_with_a_bad_sidecar(case, orbax_dir, edit, names):
    src = _orbax_variant(case, orbax_dir, edit(_meta(orbax_dir)))
    _one_error(case, ["convert", str(src), str(case.tmp / "out"), "-q"], *names)
    assert not (case.tmp / "out").exists()


# --------------------------------------------------------------------------- GGUF metadata


def _gguf(case: Case, monkeypatch, setter: str, write) -> str:
    """A tiny llama GGUF (tests/convert/test_convert_gguf) whose writer's `setter` writes `write(self, arch)` instead."""
    from tests.convert.test_convert_gguf import hf_tensors, write_gguf

    monkeypatch.setattr(gguf.GGUFWriter, setter, lambda self, *a: write(self, self.arch))
    path = write_gguf(case.tmp / "m.gguf", hf_tensors(tied=True))
    monkeypatch.undo()
    return str(path)


@pytest.mark.parametrize(
    "setter, write, names",
    [
        (
            "add_head_count",
            lambda w, a: w.add_uint32(f"{a}.attention.head_count", 0),
            ("llama.attention.head_count must be an integer >= 1, got 0",),
        ),
        (
            "add_head_count",
            lambda w, a: w.add_string(f"{a}.attention.head_count", "four"),
            ("llama.attention.head_count must be an integer >= 1, got 'four'",),
        ),
        (
            "add_head_count",
            lambda w, a: w.add_uint32(f"{a}.attention.head_count", 5),  # hidden size 32
            ("attention.head_count 5 does not divide llama.embedding_length 32",),
        ),
        (
            "add_bos_token_id",
            lambda w, a: w.add_string("tokenizer.ggml.bos_token_id", "one"),
            ("tokenizer.ggml.bos_token_id must be an integer >= 0, got 'one'",),
        ),
        (
            "add_layer_norm_rms_eps",
            lambda w, a: w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float("nan")),
            ("llama.attention.layer_norm_rms_epsilon must be finite",),
        ),
    ],
)
def test_gguf_metadata(case, monkeypatch, setter, write, names):
    path = _gguf(case, monkeypatch, setter, write)
    _one_error(case, ["convert", path, str(case.tmp / "out"), "-q"], "m.gguf", *names)
    assert not (case.tmp / "out").exists()


def test_gguf_sliding_window_pattern_zero(case, monkeypatch):
    """gemma's every-n-th-block-is-global pattern of 0 (a division by zero before)."""
    from tests.convert.test_convert_gguf_families import Family

    real = gguf.GGUFWriter.add_sliding_window

    def add(self, n):
        real(self, n)
        self.add_uint32(f"{self.arch}.attention.sliding_window_pattern", 0)

    monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window", add)
    gemma = Family("gemma2", case.tmp / "g")
    monkeypatch.undo()
    _one_error(
        case,
        ["convert", str(gemma.f32), str(case.tmp / "out"), "-q"],
        "f32.gguf",
        "gemma2.attention.sliding_window_pattern must be an integer >= 1, got 0",
    )


# --------------------------------------------------------------------------- the Python API


def test_python_api_refuses_huge_numbers_and_unbounded_iterations():
    import jax.numpy as jnp

    from sgtv_jax.merge import merge

    base, models = {"w": jnp.zeros((2, 2))}, [{"w": jnp.ones((2, 2))}]
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite, got 1000.*for tensor 'w'"):
        merge("task_arithmetic", base, models, weights=[HUGE])
    with pytest.raises(ValueError, match=r"max_iter must be <= 10000 for tensor 'w'"):
        merge("karcher", base, models, max_iter=10**9, tol=0.0)


@pytest.mark.parametrize(
    "argv, names",
    [
        (["eval", "m", "--seqlen", "abc"], ("argument --seqlen", "invalid int value: 'abc'")),
        (["merge", "c.yaml", "out", "--lora", "1.5"], ("argument --lora",)),
        (["nonsense"], ("invalid choice: 'nonsense'",)),
    ],
)
def test_argparse_errors_end_with_an_error_line(argv, names, capsys):
    """A flag argparse itself refuses (not a number at all) also ends with one `error:` line, exit 2."""
    from sgtv_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: sgtv") and all(n in last for n in names), last
