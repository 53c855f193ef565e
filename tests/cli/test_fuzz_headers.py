"""Property-based fuzzing of checkpoint headers and sidecars (the property: `tests.helpers.fuzz`).

Mutated safetensors headers (dtype, shape, offsets, metadata, header length,
truncation), config.json / tokenizer_config.json / adapter_config.json values
of the wrong type, zero, huge or non-finite, GGUF metadata values and bytes,
and Orbax `sgtv_model.json` sidecars, each fed to the commands that read them
(`sgtv check`, `sgtv merge`, `sgtv convert`, `sgtv eval`). Example counts and
the longer maintainer run: see tests/cli/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.convert.test_convert_gguf import (
    FF,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV,
    LAYERS,
    VOCAB,
    hf_tensors,
    llama_cpp_permute,
    to_gguf_name,
)
from tests.helpers.fuzz import HUGE_INT, Example, dump_yaml, fuzz_settings, make_world, numbers_st, values_st


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with make_world(tmp_path_factory.mktemp("fuzzh")) as w:
        fam = w["fam"]
        Example(w).run(["convert", w["fts"][1], fam / "orbax", "--format", "orbax"], out=fam / "orbax", fmt="orbax")
        write_gguf(fam / "tiny.gguf", GGUF_META)
        yield w


def json_values() -> st.SearchStrategy:
    """JSON-able edge values (json.dumps writes NaN / Infinity, which Python's json reads back)."""
    return st.one_of(
        numbers_st(),
        st.sampled_from(["", "x" * 100_000, "llama", "float32", "bogus", None, True, False, [], {}, [1, 2], {"a": 1}]),
        values_st().filter(lambda v: not _has_raw(v)),
    )


def _has_raw(v: Any) -> bool:
    from tests.helpers.fuzz import Raw

    if isinstance(v, Raw):
        return True
    if isinstance(v, dict):
        return any(_has_raw(k) or _has_raw(x) for k, x in v.items())
    return isinstance(v, list) and any(_has_raw(x) for x in v)


def _config(ex: Example, ft: Path, *, chat_template: str | None = None, model: str | None = None) -> Path:
    """A data-free TIES config merging ft0 and `ft` (or `model`) into the family's base."""
    w = ex.world
    raw: dict[str, Any] = {
        "models": [
            {"model": str(w["fts"][0]), "parameters": {"density": 0.5, "weight": 1.0}},
            {"model": model or str(ft), "parameters": {"density": 0.5, "weight": 1.0}},
        ],
        "merge_method": "ties",
        "base_model": str(w["base"]),
        "dtype": "float32",
    }
    if chat_template is not None:
        raw["chat_template"] = chat_template
    p = ex.dir / "m.yaml"
    p.write_text(dump_yaml(raw))
    ex.note += f"\nconfig:\n{p.read_text()}"
    return p


def _check_merge_convert(ex: Example, ft: Path, eval_too: bool = True, **config: Any) -> None:
    cfg = _config(ex, ft, **config)
    ex.run(["check", cfg, "--force"])
    ex.run(["merge", cfg, ex.dir / "out", "--quiet", "--force"], out=ex.dir / "out")
    ex.run(["convert", ft, ex.dir / "conv", "-q"], out=ex.dir / "conv")
    if eval_too:
        ex.run(["eval", ft, "--text", ex.world["fam"] / "calib.txt", "--seqlen", "16"])


def _copy_ft(ex: Example, src: Path | None = None) -> Path:
    dst = ex.dir / "ft"
    shutil.copytree(src or ex.world["fts"][1], dst)
    return dst


# --------------------------------------------------------------------------- safetensors


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: Any, body: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


@st.composite
def safetensors_mutation(draw, data: bytes) -> bytes:
    """`data` with one mutation of its header, its length prefix or its size."""
    header, body = split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "metadata", "header", "length", "cut"]))
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(
            st.one_of(
                st.sampled_from(["F16", "BF16", "I8", "F64", "BOOL", "U8", "F8_E4M3", "BOGUS", ""]), json_values()
            )
        )
    elif kind == "shape":
        dims = list(entry["shape"])
        entry["shape"] = draw(
            st.one_of(
                st.just(dims[:-1]),
                st.just(dims + [1]),
                st.just([d + 1 for d in dims]),
                st.just([-d for d in dims]),
                st.just([10**12, 10**12]),
                st.just([2**64]),
                st.just([HUGE_INT]),
                st.lists(json_values(), max_size=3),
                json_values(),
            )
        )
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = draw(
            st.one_of(
                st.sampled_from([[b, a], [a, a], [-1, b], [a, b + 1], [a, b - 1], [a, 10**15], [a], [a, b, b], None]),
                st.sampled_from([[str(a), b], [float(a), b], [a + 0.5, b], [HUGE_INT, b], [a, math.inf]]),
                st.lists(json_values(), max_size=2),
            )
        )
    elif kind == "drop":
        header.pop(name)
    elif kind == "add":
        new = draw(st.sampled_from(["model.layers.7.mlp.up_proj.weight", "lm_head.bias", "x", "", name + ".extra"]))
        header[new] = dict(entry)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values())
    elif kind == "header":
        raw = draw(
            st.sampled_from(
                [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"a": NaN}', b"[" * 10_000 + b"]" * 10_000, b"   {}"]
            )
        )
        return join_safetensors(raw, body)
    elif kind == "length":
        n = len(json.dumps(header).encode())
        length = draw(st.sampled_from([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 100 * 2**20]))
        return join_safetensors(header, body, length)
    elif kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    return join_safetensors(header, body)


@fuzz_settings(12)
@given(data=st.data())
def test_fuzz_safetensors_header(world, data):
    with Example(world) as ex:
        ft = _copy_ft(ex)
        st_file = ft / "model.safetensors"
        blob = data.draw(safetensors_mutation(st_file.read_bytes()))
        st_file.write_bytes(blob)
        ex.note = f"{st_file.name} of {len(blob)} bytes, starting {blob[:1500]!r}"
        _check_merge_convert(ex, ft)


# --------------------------------------------------------------------------- JSON sidecars

CONFIG_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "head_dim",
    "model_type",
    "architectures",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "max_position_embeddings",
    "dtype",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
]


@st.composite
def json_file_mutation(draw, text: str, keys: list[str]) -> str:
    """`text` (a JSON object) with one key set to an edge value or deleted, or the whole file replaced."""
    kind = draw(st.sampled_from(["set", "set", "delete", "unknown", "file"]))
    if kind == "file":
        return draw(st.sampled_from(["", "{", "[]", "null", "1e400", '"x"', "NaN", "\ufeff{}", "{} {}", text[:-2]]))
    obj = json.loads(text)
    key = draw(st.sampled_from(keys))
    if kind == "set":
        obj[key] = draw(json_values())
    elif kind == "delete":
        obj.pop(key, None)
    else:
        obj[draw(st.text(min_size=1, max_size=8))] = draw(json_values())
    return json.dumps(obj)


@fuzz_settings(12)
@given(data=st.data(), role=st.sampled_from(["fine-tune", "base"]))
def test_fuzz_config_json(world, data, role):
    with Example(world) as ex:
        src = world["base"] if role == "base" else world["fts"][1]
        ft = _copy_ft(ex, src)
        cfg = ft / "config.json"
        cfg.write_text(data.draw(json_file_mutation(cfg.read_text(), CONFIG_KEYS)))
        ex.note = f"{role} config.json: {cfg.read_text()[:3000]}"
        if role == "base":
            raw = {
                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in world["fts"]],
                "merge_method": "task_arithmetic",
                "base_model": str(ft),
            }
            (ex.dir / "m.yaml").write_text(dump_yaml(raw))
            ex.run(["check", ex.dir / "m.yaml", "--force"])
            ex.run(["merge", ex.dir / "m.yaml", ex.dir / "out", "--quiet", "--force"], out=ex.dir / "out")
            ex.run(["convert", ft, ex.dir / "conv", "-q"], out=ex.dir / "conv")
        else:
            _check_merge_convert(ex, ft)


TOKENIZER_CONFIG_KEYS = ["chat_template", "eos_token", "pad_token", "added_tokens_decoder", "tokenizer_class"]


@fuzz_settings(8)
@given(data=st.data(), template=st.sampled_from(["auto", "chatml", None]))
def test_fuzz_tokenizer_config_json(world, data, template):
    with Example(world) as ex:
        ft = _copy_ft(ex)
        tc = ft / "tokenizer_config.json"
        tc.write_text(data.draw(json_file_mutation(tc.read_text(), TOKENIZER_CONFIG_KEYS)))
        ex.note = f"tokenizer_config.json: {tc.read_text()[:3000]}"
        _check_merge_convert(ex, ft, eval_too=False, chat_template=template)


ADAPTER_KEYS = [
    "peft_type",
    "base_model_name_or_path",
    "target_modules",
    "bias",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "use_rslora",
    "task_type",
]


def _adapter_merge(ex: Example, text: str) -> None:
    w = ex.world
    adapter = ex.dir / "adapter"
    shutil.copytree(w["fam"] / "adapter", adapter)
    (adapter / "adapter_config.json").write_text(text)
    ex.note = f"adapter_config.json: {text[:3000]}"
    cfg = _config(ex, adapter, model=f"{w['base']}+{adapter}")
    ex.run(["check", cfg, "--force"])
    ex.run(["merge", cfg, ex.dir / "out", "--quiet", "--force"], out=ex.dir / "out")


@fuzz_settings(12)
@given(data=st.data())
def test_fuzz_adapter_config_json(world, data):
    text = (world["fam"] / "adapter" / "adapter_config.json").read_text()
    with Example(world) as ex:
        _adapter_merge(ex, data.draw(json_file_mutation(text, ADAPTER_KEYS)))


@fuzz_settings(8)
@given(data=st.data())
def test_fuzz_adapter_rank_alpha(world, data):
    text = (world["fam"] / "adapter" / "adapter_config.json").read_text()
    with Example(world) as ex:
        obj = json.loads(text)
        key = data.draw(st.sampled_from(["r", "lora_alpha"]))
        obj[key] = data.draw(st.one_of(st.sampled_from([HUGE_INT, -HUGE_INT, 2**63, 0, -1, 1e308, "8"]), json_values()))
        _adapter_merge(ex, json.dumps(obj))


# --------------------------------------------------------------------------- Orbax


ORBAX_KEYS = ["format", "hf_config", "model_type", "param_dtype"]


@fuzz_settings(8)
@given(data=st.data(), nested=st.booleans())
def test_fuzz_orbax_sidecar(world, data, nested):
    with Example(world) as ex:
        orb = ex.dir / "orbax"
        shutil.copytree(world["fam"] / "orbax", orb)
        side = orb / "sgtv_model.json"
        if nested:  # a key of the HF config inside the sidecar
            obj = json.loads(side.read_text())
            obj["hf_config"] = json.loads(data.draw(json_file_mutation(json.dumps(obj["hf_config"]), CONFIG_KEYS)))
            side.write_text(json.dumps(obj))
        else:
            side.write_text(data.draw(json_file_mutation(side.read_text(), ORBAX_KEYS)))
        ex.note = f"sgtv_model.json: {side.read_text()[:3000]}"
        ex.run(["convert", orb, ex.dir / "conv", "-q"], out=ex.dir / "conv")


# --------------------------------------------------------------------------- GGUF

U32, F32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
GGUF_META: dict[str, tuple[Any, Any]] = {
    "llama.context_length": (128, U32),
    "llama.embedding_length": (HIDDEN, U32),
    "llama.block_count": (LAYERS, U32),
    "llama.feed_forward_length": (FF, U32),
    "llama.attention.head_count": (HEADS, U32),
    "llama.attention.head_count_kv": (KV, U32),
    "llama.rope.dimension_count": (HEAD_DIM, U32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, F32),
    "llama.rope.freq_base": (50000.0, F32),
    "llama.vocab_size": (VOCAB, U32),
    "general.file_type": (0, U32),
    "tokenizer.ggml.model": ("gpt2", STR),
    "tokenizer.ggml.bos_token_id": (VOCAB - 2, U32),
    "tokenizer.ggml.eos_token_id": (VOCAB - 1, U32),
}
"""The metadata of test_convert_gguf.write_gguf as (value, type) (the token list is added by `write_gguf`)."""


def write_gguf(path: Path, meta: dict[str, tuple[Any, Any]]) -> Path:
    """A tiny llama GGUF (q/k permuted as llama.cpp writes them) with metadata `meta`."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in meta.items():
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    tokens = ["t", "1", "t1"] + [f"x{i}" for i in range(VOCAB - 6)] + ["<unk>", "<s>", "</s>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 1"])
    for name, arr in hf_tensors(tied=True).items():
        if ".q_proj." in name:
            arr = llama_cpp_permute(arr, HEADS, HEADS)
        elif ".k_proj." in name:
            arr = llama_cpp_permute(arr, HEADS, KV)
        w.add_tensor(to_gguf_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


T = gguf.GGUFValueType


@st.composite
def gguf_values(draw) -> tuple[Any, Any]:
    """A metadata value and its GGUF type: zero, negative, huge, non-finite, a string, an array."""
    return draw(
        st.one_of(
            st.tuples(st.sampled_from([0, 1, 3, 2**32 - 1]), st.just(T.UINT32)),
            st.tuples(st.sampled_from([0, -1, -(2**31)]), st.just(T.INT32)),
            st.tuples(st.sampled_from([0, 2**64 - 1, 2**63]), st.just(T.UINT64)),
            st.tuples(st.sampled_from([-(2**63), -1]), st.just(T.INT64)),
            st.tuples(st.sampled_from([0.0, -1.0, math.inf, -math.inf, math.nan, 1e30]), st.just(T.FLOAT32)),
            st.tuples(st.sampled_from([1e300, math.nan, 5e-324]), st.just(T.FLOAT64)),
            st.tuples(st.booleans(), st.just(T.BOOL)),
            st.tuples(st.sampled_from(["", "4", "x" * 10_000, "llama"]), st.just(T.STRING)),
            st.tuples(st.sampled_from([[4, 4], [], [0], ["a"]]), st.just(T.ARRAY)),
        )
    )


@fuzz_settings(25)
@given(data=st.data())
def test_fuzz_gguf_metadata(world, data):
    meta = dict(GGUF_META)
    key = data.draw(st.sampled_from(sorted(meta) + ["llama.attention.sliding_window", "general.alignment"]))
    if data.draw(st.booleans()) and key in meta:
        meta.pop(key)
    else:
        meta[key] = data.draw(gguf_values())
    with Example(world) as ex:
        path = write_gguf(ex.dir / "m.gguf", meta)
        ex.note = f"GGUF metadata {key}: {meta.get(key, 'removed')!r:.300}"
        ex.run(["convert", path, ex.dir / "conv", "-q"], out=ex.dir / "conv")


@fuzz_settings(8)
@given(data=st.data())
def test_fuzz_gguf_bytes(world, data):
    """A valid GGUF cut short, or with bytes overwritten (counts, lengths, offsets, tensor types)."""
    blob = (world["fam"] / "tiny.gguf").read_bytes()
    with Example(world) as ex:
        path = ex.dir / "m.gguf"
        if data.draw(st.booleans()):
            cut = data.draw(st.integers(0, len(blob) - 1))
            path.write_bytes(blob[:cut])
            ex.note = f"GGUF cut to {cut} of {len(blob)} bytes"
        else:
            at = data.draw(st.integers(4, min(len(blob), 4096) - 8))
            patch = data.draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, struct.pack("<q", -1), b"\x7f" * 4]))
            path.write_bytes(blob[:at] + patch + blob[at + len(patch) :])
            ex.note = f"GGUF bytes {at}.. overwritten with {patch!r}"
        ex.run(["convert", path, ex.dir / "conv", "-q"], out=ex.dir / "conv")
