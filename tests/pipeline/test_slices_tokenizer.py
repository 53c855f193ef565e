"""`slices` (frankenmerges, layer-range merges), `tokenizer_source: union`, `chat_template`, `out_dtype`.

Expectations are independent of the code under test: the source checkpoints'
stored bytes (passthrough copies), float64 NumPy weighted means of the source
tensors, and the union vocabulary / fill rule worked out by hand from the two
tokenizers (mergekit's rule: a token one model lacks takes the base's row, else
the one model's row having it, else the mean).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from sgtv_jax.pipeline.chat_templates import CHATML
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

EXTRA = ["<extra_a>", "<extra_b>"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices_llama")
    return H.make_family(root, "llama", tasks=2)


def _tensors(d: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _generate(d: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = model.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert ids.shape == (1, 7)
    return ids


def test_frankenmerge_stacks_layers_byte_for_byte_and_generates(fam, tmp_path):
    a, b = fam["fts"]
    raw = {
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    cfg = parse_config(raw)
    res = check_config(cfg)
    assert res.num_layers == 4
    out = tmp_path / "franken"
    rep = run_merge(cfg, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    got, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    # output layer -> (model, its layer): [0, 2) of A, then [1, 3) of B
    where = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (tb, 2)}
    for name, arr in got.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            src, j = where[i]
            want = src[name.replace(f".layers.{i}.", f".layers.{j}.")]
        else:  # embeddings from the first slice's model, final norm and head from the last's
            want = (ta if "embed" in name else tb)[name]
        assert arr.dtype == want.dtype and arr.tobytes() == want.tobytes(), name
    assert len(got) == len(ta) + sum(1 for n in ta if ".layers.0." in n)  # one more layer
    assert rep["slices"][1]["sources"][0]["layer_range"] == [1, 3]
    _generate(out)


def test_slices_linear_merge_of_layer_ranges_matches_numpy(fam, tmp_path):
    """Two models' layer ranges merged by linear, per-source and per-slice weights (mergekit's precedence)."""
    base, (a, b) = fam["base"], fam["fts"]
    raw = {
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 3.0}},
                    {"model": str(b), "layer_range": [1, 3]},
                ],
                "parameters": {"weight": 1.0},
            },
            {
                "sources": [
                    {"model": str(base), "layer_range": [2, 3]},
                    {"model": str(b), "layer_range": [0, 1]},
                ],
            },
        ],
        "merge_method": "linear",
        "parameters": {"weight": 0.5},
        "dtype": "float32",
    }
    out = tmp_path / "lin"
    run_merge(parse_config(raw), out, progress=False)
    got, t0, ta, tb = _tensors(out), _tensors(base), _tensors(a), _tensors(b)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3

    def mean(pairs):
        w = sum(p for p, _ in pairs)
        return sum(p * x.astype(np.float64) for p, x in pairs) / w

    for name, arr in got.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            sub = lambda j, n=name, i=i: n.replace(f".layers.{i}.", f".layers.{j}.")  # noqa: E731
            if i < 2:  # slice 0: A (source weight 3) and B (slice weight 1)
                want = mean([(3.0, ta[sub(i)]), (1.0, tb[sub(i + 1)])])
            else:  # slice 1: base and B, the top-level weight 0.5 each
                want = mean([(0.5, t0[sub(2)]), (0.5, tb[sub(0)])])
        elif "embed" in name:
            want = mean([(3.0, ta[name]), (1.0, tb[name])])
        else:
            want = mean([(0.5, t0[name]), (0.5, tb[name])])
        np.testing.assert_allclose(arr, want, rtol=1e-6, atol=1e-7, err_msg=name)
    _generate(out)


def test_slices_refusals_name_the_slice(fam, tmp_path):
    base, (a, b) = fam["base"], fam["fts"]

    def src(m, r):
        return {"model": str(m), "layer_range": r}

    cases = [
        (
            {"slices": [{"sources": [src(a, [0, 2]), src(b, [0, 1])]}], "merge_method": "linear"},
            "same number of layers",
        ),
        ({"slices": [{"sources": [src(a, [0, 2]), src(b, [0, 2])]}], "merge_method": "passthrough"}, "one source per"),
        (
            {
                "slices": [{"sources": [src(a, [0, 2]), src(b, [0, 2])]}],
                "merge_method": "ties",
                "base_model": str(base),
            },
            r"slices\[0\]: merge_method 'ties' merges task vectors against a base model",
        ),
        ({"slices": [{"sources": [src(a, [2, 1])]}], "merge_method": "passthrough"}, "0 <= start < stop"),
        (
            {
                "slices": [{"sources": [src(base, [0, 2]), src(a, [0, 2])]}],
                "merge_method": "ties",
                "base_model": str(base),
                "trim": "sparsegpt",
                "calibration": {"data": "c.txt"},
            },
            "slices with calibration data",
        ),
        (
            {
                "slices": [{"sources": [src(base, [0, 2]), src(a, [0, 2])]}],
                "merge_method": "slerp",
                "base_model": str(base),
            },
            r"slices\[0\]: parameters.t is required",
        ),
    ]
    for raw, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_config(raw)
    cfg = parse_config({"slices": [{"sources": [src(a, [1, 5])]}], "merge_method": "passthrough"})
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[0\].layer_range \[1, 5\]: .* has 3 layers"):
        check_config(cfg)


def test_slices_slerp_gradient_over_the_slice(fam, tmp_path):
    """slerp with the base among a slice's sources, t a gradient over the slice's own layers (0, 0.5, 1)."""
    base, (a, _) = fam["base"], fam["fts"]
    raw = {
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]}, {"model": str(a), "layer_range": [0, 3]}]}
        ],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    out = tmp_path / "slerp"
    run_merge(parse_config(raw), out, progress=False)
    got, t0, ta = _tensors(out), _tensors(base), _tensors(a)
    for i, t in enumerate((0.0, 0.5, 1.0)):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        x, y = t0[name].astype(np.float64).ravel(), ta[name].astype(np.float64).ravel()
        om = np.arccos(np.clip(x @ y / np.linalg.norm(x) / np.linalg.norm(y), -1, 1))
        want = (np.sin((1 - t) * om) * x + np.sin(t * om) * y) / np.sin(om)
        np.testing.assert_allclose(got[name].ravel(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    # outside the layers (mergekit's plan.py): embeddings at position 0 (the base's), final norm at 1 (A's)
    np.testing.assert_allclose(got["model.embed_tokens.weight"], t0["model.embed_tokens.weight"], rtol=1e-6)
    np.testing.assert_allclose(got["model.norm.weight"], ta["model.norm.weight"], rtol=1e-6)


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def vocab_fam(tmp_path_factory, fam):
    """base and ft0 with the family's tokenizer; `wide`: a fine-tune whose tokenizer adds EXTRA (2 more rows)."""
    root = tmp_path_factory.mktemp("vocab")
    tokdir = root / "tok_wide"
    tok = transformers.AutoTokenizer.from_pretrained(str(fam["base"]))
    tok.add_tokens(EXTRA)
    tok.save_pretrained(str(tokdir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(fam["base"]), dtype=torch.float32)
    n = model.config.vocab_size
    model.resize_token_embeddings(n + len(EXTRA), mean_resizing=False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    wide = H.save_model(model, root / "wide", tokdir)
    return {"base": fam["base"], "narrow": fam["fts"][0], "wide": wide, "n": n}


def test_union_tokenizer_resizes_and_fills_embeddings_like_mergekit(vocab_fam, tmp_path):
    v = vocab_fam
    raw = {
        "models": [
            {"model": str(v["narrow"]), "parameters": {"weight": 1.0}},
            {"model": str(v["wide"]), "parameters": {"weight": 3.0}},
        ],
        "base_model": str(v["base"]),
        "merge_method": "task_arithmetic",
        "dtype": "float32",
        "tokenizer": {"source": "union", "tokens": {"<brand_new>": {}}},
        "chat_template": "chatml",
    }
    cfg = parse_config(raw)
    assert check_config(cfg).vocab_size == v["n"] + 3
    out = tmp_path / "union"
    rep = run_merge(cfg, out, progress=False)
    n, V = v["n"], v["n"] + 3
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    vocab = tok.get_vocab()
    assert len(vocab) == V and [vocab[t] for t in EXTRA] == [n, n + 1] and vocab["<brand_new>"] == n + 2
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V
    assert rep["tokenizer"]["no_source"] == ["<brand_new>"]
    assert rep["tokenizer"]["added"] == EXTRA + ["<brand_new>"]
    got, tb, tn, tw = _tensors(out), _tensors(v["base"]), _tensors(v["narrow"]), _tensors(v["wide"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        b, x, w = (t[name].astype(np.float64) for t in (tb, tn, tw))
        want = np.zeros((V, b.shape[1]))
        # tokens every model has: base + 1 * (narrow - base) + 3 * (wide - base)
        want[:n] = b + 1.0 * (x - b) + 3.0 * (w[:n] - b)
        # EXTRA: only `wide` has them, so the base and `narrow` are filled with its rows: the task
        # vectors there are zero and the merge is wide's row
        want[n : n + 2] = w[n : n + 2]
        # <brand_new>: in no model -> zero rows everywhere
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    _generate(out)
    enc = tok("hi <extra_a>")["input_ids"]
    assert n in enc


def test_base_tokenizer_maps_a_wider_model_to_the_base_vocabulary(vocab_fam, tmp_path):
    """tokenizer_source: base keeps the base's vocabulary; the extra rows of the wider model are dropped."""
    v = vocab_fam
    raw = {
        "models": [{"model": str(v["wide"])}],
        "base_model": str(v["base"]),
        "merge_method": "linear",
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    out = tmp_path / "tb"
    cfg = parse_config(raw)
    assert cfg.dtype == "bf16" and cfg.to_dict()["dtype"] == "fp32"
    run_merge(cfg, out, progress=False)
    got = _tensors(out)
    assert all(str(a.dtype) == "bfloat16" for a in got.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    n = v["n"]
    want = _tensors(v["wide"])["model.embed_tokens.weight"][:n].astype(np.float32)
    np.testing.assert_array_equal(
        got["model.embed_tokens.weight"].astype(np.float32),
        want.astype(got["model.embed_tokens.weight"].dtype).astype(np.float32),
    )
    _generate(out)


def test_same_tokenizer_base_is_the_plain_merge(fam, tmp_path):
    """tokenizer_source: base over one vocabulary re-indexes nothing: the same bytes as without it."""
    raw = {
        "models": [{"model": str(p)} for p in fam["fts"]],
        "base_model": str(fam["base"]),
        "merge_method": "linear",
        "dtype": "float32",
    }
    run_merge(parse_config(raw), tmp_path / "plain", progress=False)
    run_merge(parse_config({**raw, "tokenizer_source": "base"}), tmp_path / "tb", progress=False)
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "tb")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_slices_gradient_positions_outside_the_layers_are_mergekits(fam, tmp_path):
    """mergekit's plan: embeddings at gradient position 0, the final norm and head at 1."""
    a, b = fam["fts"]
    raw = {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [0, 3]}]}],
        "merge_method": "linear",
        "parameters": {"weight": 1.0, "normalize": True},
        "dtype": "float32",
    }
    # A's weight runs 1 -> 3 over positions 0 .. 1; B's stays 1.
    raw["slices"][0]["sources"][0]["parameters"] = {"weight": [1.0, 3.0]}
    out = tmp_path / "grad"
    run_merge(parse_config(raw), out, progress=False)
    got, ta, tb = _tensors(out), _tensors(a), _tensors(b)

    def mean(wa: float, name: str) -> np.ndarray:
        return (wa * ta[name].astype(np.float64) + tb[name].astype(np.float64)) / (wa + 1.0)

    for name, arr in got.items():
        if ".layers." in name:
            wa = 1.0 + 2.0 * int(name.split(".layers.")[1].split(".")[0]) / 2  # layer i of 3: t = i / 2
        else:
            wa = 1.0 if "embed" in name else 3.0
        np.testing.assert_allclose(arr, mean(wa, name), rtol=1e-6, atol=1e-7, err_msg=name)


def test_equal_tokenizer_files_are_parsed_once(vocab_fam, monkeypatch):
    """Checkpoints carrying the same tokenizer files share one parse (transformers takes seconds a load);
    `union` still extends a fresh copy, so the shared parses keep their own vocabularies."""
    from sgtv_jax.pipeline import tokenizer as T
    from sgtv_jax.pipeline.mapped import headers_plan

    v, loads = vocab_fam, []
    real = T.load_local_tokenizer
    monkeypatch.setattr(T, "load_local_tokenizer", lambda d: loads.append(Path(d)) or real(d))
    raw = {"models": [{"model": str(v["narrow"])}], "base_model": str(v["base"]), "merge_method": "linear"}
    assert headers_plan(parse_config({**raw, "tokenizer_source": "base"})) is None  # nothing to re-index
    assert loads == [v["base"]]  # narrow's files are the base's: not parsed again
    loads.clear()
    raw["models"].append({"model": str(v["wide"])})
    _, vm = headers_plan(parse_config({**raw, "tokenizer_source": "union"}))
    assert loads == [v["base"], v["wide"], v["base"]]  # the base's files, wide's, the copy union extends
    n = v["n"]
    assert [len(m) for m in vm.vocabs] == [n, n, n + len(EXTRA)]  # the shared parse was not extended
    assert [vm.vocab[t] for t in EXTRA] == [n, n + 1]
