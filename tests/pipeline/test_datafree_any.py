"""Data-free merges of architectures with and without a Flax family here, by tensor name.

Tiny random checkpoints of six transformers architectures (T5 encoder-decoder,
ViT image classifier, OPT, Falcon, GPT-NeoX, Mistral) are saved with
`save_pretrained`; each fine-tune is the base plus a random perturbation with
exact zeros, some tensors untouched. Every merged output must load in
transformers with no missing tensor, and every tensor must equal a float64
NumPy merge written here from the methods' definitions (TIES, task
arithmetic), or, for the seeded random DARE trim, `sgtv_jax.merge.merge` on the
same tensors with the same seed, with the kept fraction at the density. The
gradient over blocks is resolved with this file's own per-architecture block
patterns. Then the rules for tensors that differ: vocabulary sizes, tied and
untied heads, tensors only some models have.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from sgtv_jax.cli import main
from sgtv_jax.merge import merge as library_merge
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge

V = 48  # vocabulary of the text models
EPS32 = 2.0**-23


def _t5():
    return transformers.T5Config(
        vocab_size=V,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _vit():
    return transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=5,
    )


def _opt():
    return transformers.OPTConfig(
        vocab_size=V,
        hidden_size=16,
        ffn_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )


def _falcon(**kw):
    return transformers.FalconConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, bos_token_id=0, eos_token_id=0, **kw
    )


def _neox():
    return transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )


def _mistral(**kw):
    return transformers.MistralConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        **kw,
    )


# model type: (config, transformers class, auto class, [(block pattern, config key of that stack's depth)])
ARCHS = {
    "t5": (
        _t5,
        transformers.T5ForConditionalGeneration,
        transformers.AutoModelForSeq2SeqLM,
        [(r"^encoder\.block\.(\d+)\.", "num_layers"), (r"^decoder\.block\.(\d+)\.", "num_decoder_layers")],
    ),
    "vit": (
        _vit,
        transformers.ViTForImageClassification,
        transformers.AutoModelForImageClassification,
        [(r"^vit\.encoder\.layer\.(\d+)\.", "num_hidden_layers")],
    ),
    "opt": (
        _opt,
        transformers.OPTForCausalLM,
        transformers.AutoModelForCausalLM,
        [(r"^model\.decoder\.layers\.(\d+)\.", "num_hidden_layers")],
    ),
    "falcon": (
        _falcon,
        transformers.FalconForCausalLM,
        transformers.AutoModelForCausalLM,
        [(r"^transformer\.h\.(\d+)\.", "num_hidden_layers")],
    ),
    "gpt_neox": (
        _neox,
        transformers.GPTNeoXForCausalLM,
        transformers.AutoModelForCausalLM,
        [(r"^gpt_neox\.layers\.(\d+)\.", "num_hidden_layers")],
    ),
    "mistral": (
        _mistral,
        transformers.MistralForCausalLM,
        transformers.AutoModelForCausalLM,
        [(r"^model\.layers\.(\d+)\.", "num_hidden_layers")],
    ),
}
# Mistral has a Flax family here: its name map merges the embedding in the swapped [hidden, vocab] view
SWAPPED = {"mistral": ("model.embed_tokens.weight",)}


def _perturb(model: torch.nn.Module, rng: np.random.Generator, t: int) -> None:
    """Add 0.02 * N(0, 1) with 30% exact zeros; parameter i stays untouched when i % 5 == t or i % 7 == 6."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if i % 5 == t or i % 7 == 6:
                continue
            d = 0.02 * rng.standard_normal(p.shape) * (rng.random(p.shape) >= 0.3)
            p.add_(torch.from_numpy(d.astype(np.float32)))


def make_models(root: Path, arch: str, *, tasks: int = 2, seed: int = 0, config=None) -> dict:
    """Base + `tasks` fine-tunes of `arch` saved with save_pretrained; returns their paths."""
    make_config, cls, _, _ = ARCHS[arch]
    torch.manual_seed(seed)
    base = cls(config or make_config()).eval()
    paths = {"base": root / "base", "fts": []}
    base.save_pretrained(str(paths["base"]))
    rng = np.random.default_rng(seed + 1)
    for t in range(tasks):
        ft = cls(config or make_config()).eval()
        ft.load_state_dict(base.state_dict())
        _perturb(ft, rng, t)
        ft.save_pretrained(str(root / f"ft{t}"))
        paths["fts"].append(root / f"ft{t}")
    return paths


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _position(arch: str, name: str, config: dict) -> float:
    """Where `name` sits on a gradient: block i of a stack of depth L -> i / (L - 1); else 0 (embeddings) or 1."""
    for pattern, key in ARCHS[arch][3]:
        m = re.match(pattern, name)
        if m:
            return int(m.group(1)) / max(config[key] - 1, 1)
    return 0.0 if any(k in name for k in ("embed", "wte", "wpe")) else 1.0


def _magnitude(d: np.ndarray, density: float) -> np.ndarray:
    """Keep the round(density * n) largest |d| (ties: the earlier entry in row-major order)."""
    k = round(density * d.size)
    order = np.argsort(-np.abs(d).reshape(-1), kind="stable")
    keep = np.zeros(d.size, bool)
    keep[order[:k]] = True
    return np.where(keep.reshape(d.shape), d, 0.0)


def ties_reference(deltas: list[np.ndarray], densities: list[float], weights: list[float]) -> np.ndarray:
    """TIES: magnitude trim, sign elected by the weighted sum (0 -> +), disjoint weighted mean."""
    x = np.stack([_magnitude(d, k) for d, k in zip(deltas, densities)])
    w = np.asarray(weights).reshape((-1,) + (1,) * (x.ndim - 1))
    elected = np.where((w * x).sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(w * x) == elected
    num = (w * x * agree).sum(0)
    den = (w * agree).sum(0)
    return num / np.where(den == 0, 1.0, den)


def task_arithmetic_reference(deltas: list[np.ndarray], weights: list[float], lam: float) -> np.ndarray:
    return lam * sum(w * d for w, d in zip(weights, deltas))


def _config(paths: dict, method: str, **over) -> dict:
    cfg = {
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths["fts"], (1.0, 0.7))],
        "merge_method": method,
        "base_model": str(paths["base"]),
        "dtype": "float32",
    }
    cfg.update(over)
    return cfg


def _load(arch: str, out: Path) -> dict[str, np.ndarray]:
    """Load `out` in transformers (nothing missing); returns the safetensors written."""
    model, info = ARCHS[arch][2].from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    written = _tensors(out)
    # what transformers loaded, saved back under the checkpoint's names (it renames some on load)
    model.save_pretrained(str(out.parent / f"{out.name}_resaved"))
    resaved = _tensors(out.parent / f"{out.name}_resaved")
    assert set(resaved) == set(written)
    for k, v in written.items():
        np.testing.assert_array_equal(resaved[k], v, err_msg=f"{k} as transformers loaded it")
    return written


def _assert_close(
    got: np.ndarray, want: np.ndarray, base: np.ndarray, deltas: list[np.ndarray], what: str, scale: float = 1.0
) -> None:
    """Equal up to float32 rounding: a few ulps of the magnitudes summed (base, `scale` x each task vector)."""
    tol = 4 * EPS32 * (np.abs(base) + scale * sum(np.abs(d) for d in deltas) + np.abs(want)) + 1e-30
    bad = np.abs(got.astype(np.float64) - want) > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} entries off, max {np.abs(got - want).max():.3g}"


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    return arch, root, make_models(root, arch)


def test_ties_equals_numpy_reference(family):
    arch, root, paths = family
    grad = [0.3, 0.8]
    raw = _config(paths, "ties", parameters={"normalize": True})
    raw["models"][0]["parameters"]["density"] = grad
    raw["models"][1]["parameters"]["density"] = 0.6
    rep = run_merge(parse_config(raw), root / "ties", progress=False)
    assert rep["merge_path"] == "by_name" and rep["model_type"] == arch
    got = _load(arch, root / "ties")
    base, fts = _tensors(paths["base"]), [_tensors(p) for p in paths["fts"]]
    assert set(got) == set(base)
    config = json.loads((paths["base"] / "config.json").read_text())
    rows = {r["name"]: r for r in rep["layers"]}
    unchanged = 0
    for name, b in base.items():
        b64 = b.astype(np.float64)
        deltas = [f[name].astype(np.float64) - b64 for f in fts]
        if not any(d.any() for d in deltas):
            unchanged += 1
            assert rows[name]["trim"] == "unchanged"
            np.testing.assert_array_equal(got[name], b, err_msg=name)
            continue
        dens = [float(np.interp(_position(arch, name, config), np.linspace(0, 1, 2), grad)), 0.6]
        swap = b.ndim == 2 and name in SWAPPED.get(arch, ())
        view = [d.T for d in deltas] if swap else deltas
        want = ties_reference(view, dens, [1.0, 0.7])
        _assert_close(got[name], b64 + (want.T if swap else want), b64, deltas, name)
        assert rows[name]["trim"] == "magnitude"
    assert unchanged > 0  # the fixture leaves some tensors untouched by every fine-tune


def test_task_arithmetic_equals_numpy_reference(family):
    arch, root, paths = family
    raw = _config(paths, "task_arithmetic", parameters={"lambda": 1.3})
    run_merge(parse_config(raw), root / "ta", progress=False)
    got = _load(arch, root / "ta")
    base, fts = _tensors(paths["base"]), [_tensors(p) for p in paths["fts"]]
    assert set(got) == set(base)
    for name, b in base.items():
        b64 = b.astype(np.float64)
        deltas = [f[name].astype(np.float64) - b64 for f in fts]
        want = task_arithmetic_reference(deltas, [1.0, 0.7], 1.3)
        _assert_close(got[name], b64 + want, b64, deltas, name, scale=1.3)


def test_dare_ties_equals_library_merge_and_keeps_the_density(family):
    arch, root, paths = family
    raw = _config(paths, "dare_ties", seed=17, parameters={"lambda": 0.9})
    for m in raw["models"]:
        m["parameters"]["density"] = 0.4
    rep = run_merge(parse_config(raw), root / "dare", progress=False)
    got = _load(arch, root / "dare")
    base, fts = _tensors(paths["base"]), [_tensors(p) for p in paths["fts"]]
    swapped = SWAPPED.get(arch, ())
    want = library_merge(
        "dare_ties",
        base,
        fts,
        weights=[1.0, 0.7],
        densities=0.4,
        seed=17,
        lambda_=0.9,
        layout=lambda n: "flax" if n in swapped else "torch",
    )
    assert set(got) == set(base)
    for name in base:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    # the random trim keeps each nonzero task-vector entry with probability 0.4
    rows = {r["name"]: r for r in rep["layers"]}
    for t, f in enumerate(fts):
        kept = nonzero = 0
        for name, b in base.items():
            nz = int(np.count_nonzero(f[name].astype(np.float64) - b))
            if rows[name]["trim"] == "unchanged":
                assert nz == 0
                continue
            kept += round(rows[name]["kept_density"][t] * b.size)
            nonzero += nz
        sigma = math.sqrt(nonzero * 0.4 * 0.6)
        assert abs(kept - 0.4 * nonzero) < 4 * sigma, (t, kept, nonzero)


# --------------------------------------------------------------------------- tensors that differ


def _check_and_merge_refuse(raw: dict, out: Path, *needles: str) -> None:
    cfg = parse_config(raw)
    for call in (lambda: check_config(cfg), lambda: run_merge(cfg, out, progress=False)):
        with pytest.raises(ConfigError) as e:
            call()
        for n in needles:
            assert n in str(e.value), (n, str(e.value))
    assert not out.exists()


def test_vocabulary_mismatch_refused_pointing_at_tokenizer_source(tmp_path):
    paths = make_models(tmp_path, "opt")
    ft = transformers.OPTForCausalLM.from_pretrained(str(paths["fts"][1]))
    ft.resize_token_embeddings(V + 8)
    ft.save_pretrained(str(tmp_path / "ft_big"))
    raw = _config(paths, "task_arithmetic")
    raw["models"][1]["model"] = str(tmp_path / "ft_big")
    _check_and_merge_refuse(raw, tmp_path / "out", "vocabulary", f"{V}", f"{V + 8}", "tokenizer_source")

    # the configs agree but the stored embedding does not: refused by the tensor's rows
    odd = tmp_path / "ft_rows"
    shutil.copytree(paths["fts"][0], odd)
    sd = load_file(str(odd / "model.safetensors"))
    name = "model.decoder.embed_tokens.weight"
    sd[name] = np.concatenate([sd[name], sd[name][:4]])
    save_file(sd, str(odd / "model.safetensors"), metadata={"format": "pt"})
    raw["models"][1]["model"] = str(odd)
    _check_and_merge_refuse(raw, tmp_path / "out", name, "vocabulary", "tokenizer_source")


def test_other_shape_mismatch_named(tmp_path):
    paths = make_models(tmp_path, "gpt_neox")
    odd = tmp_path / "ft_odd"
    shutil.copytree(paths["fts"][0], odd)
    sd = load_file(str(odd / "model.safetensors"))
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    sd[name] = sd[name][:-2]
    save_file(sd, str(odd / "model.safetensors"), metadata={"format": "pt"})
    raw = _config(paths, "task_arithmetic")
    raw["models"][0]["model"] = str(odd)
    _check_and_merge_refuse(raw, tmp_path / "out", name, "different shapes", "[22, 16]", "[24, 16]")


def test_tensor_only_some_models_have(tmp_path):
    """Missing in a fine-tune: the base's. Only in fine-tunes: the first one's. Both reported."""
    paths = make_models(tmp_path, "falcon")
    lacking, extra = tmp_path / "ft_lacking", tmp_path / "ft_extra"
    shutil.copytree(paths["fts"][0], lacking)
    shutil.copytree(paths["fts"][1], extra)
    gone = "transformer.h.2.mlp.dense_4h_to_h.weight"
    sd = load_file(str(lacking / "model.safetensors"))
    del sd[gone]
    save_file(sd, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    sd = load_file(str(extra / "model.safetensors"))
    sd["value_head.weight"] = np.arange(16, dtype=np.float32).reshape(1, 16)
    sd["step_count"] = np.asarray([7], np.int64)  # an integer buffer that differs: the base's is kept
    save_file(sd, str(extra / "model.safetensors"), metadata={"format": "pt"})
    for d in (paths["base"], lacking):
        sd_d = load_file(str(d / "model.safetensors"))
        sd_d["step_count"] = np.asarray([3], np.int64)
        save_file(sd_d, str(d / "model.safetensors"), metadata={"format": "pt"})
    raw = _config(paths, "task_arithmetic")
    raw["models"][0]["model"], raw["models"][1]["model"] = str(lacking), str(extra)
    assert "taken from the base" in check_config(parse_config(raw)).summary()
    rep = run_merge(parse_config(raw), tmp_path / "out", progress=False)
    got = _tensors(tmp_path / "out")
    base = _tensors(paths["base"])
    np.testing.assert_array_equal(got[gone], base[gone])
    np.testing.assert_array_equal(got["value_head.weight"], sd["value_head.weight"])
    assert got["step_count"].dtype == np.int64 and got["step_count"].tolist() == [3]
    rules = {(r["tensor"], r["rule"]) for r in rep["tensor_rules"]}
    assert (gone, "taken from the base") in rules
    assert ("value_head.weight", "copied from the first model having it") in rules
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"]


@pytest.mark.parametrize("base_ties", [True, False])
def test_tied_and_untied_heads(tmp_path, base_ties):
    """A tied model's head is its embedding; the output unties when the base ties and a fine-tune does not."""
    torch.manual_seed(3)
    tied = transformers.FalconForCausalLM(_falcon(tie_word_embeddings=True)).eval()
    rng = np.random.default_rng(5)
    dirs = {}
    for label, ties in (("base", base_ties), ("ft_untied", False), ("ft_tied", True)):
        m = transformers.FalconForCausalLM(_falcon(tie_word_embeddings=ties)).eval()
        m.load_state_dict(
            {k: v.clone() for k, v in tied.state_dict().items()}
        )  # an untied head starts as the embedding
        if label != "base":
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.from_numpy((0.02 * rng.standard_normal(p.shape)).astype(np.float32)))
        m.save_pretrained(str(tmp_path / label))
        dirs[label] = tmp_path / label
    heads = {}
    for label, p in dirs.items():
        t = _tensors(p)
        heads[label] = t.get("lm_head.weight", t["transformer.word_embeddings.weight"]).astype(np.float64)
    assert ("lm_head.weight" in _tensors(dirs["ft_untied"])) and ("lm_head.weight" not in _tensors(dirs["ft_tied"]))
    raw = _config({"base": dirs["base"], "fts": [dirs["ft_untied"], dirs["ft_tied"]]}, "task_arithmetic")
    rep = run_merge(parse_config(raw), tmp_path / "out", progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the untied fine-tune's head survives either way
    got = _load("falcon", tmp_path / "out")
    deltas = [heads["ft_untied"] - heads["base"], heads["ft_tied"] - heads["base"]]
    want = heads["base"] + task_arithmetic_reference(deltas, [1.0, 0.7], 1.0)
    _assert_close(got["lm_head.weight"], want, heads["base"], deltas, "lm_head.weight")
    rules = {r["rule"] for r in rep["tensor_rules"] if r["tensor"] == "lm_head.weight"}
    assert rules == ({"untied output"} if base_ties else {"tied model's head is its embedding"})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert not torch.equal(model.lm_head.weight, model.transformer.word_embeddings.weight)


def test_every_model_tied_writes_no_head(tmp_path):
    paths = make_models(tmp_path, "opt")  # OPT ties its head by default
    rep = run_merge(parse_config(_config(paths, "task_arithmetic")), tmp_path / "out", progress=False)
    assert "lm_head.weight" not in _tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings", True)
    assert rep["tensor_rules"] == []


def test_report_card_and_check_for_an_unregistered_architecture(tmp_path):
    paths = make_models(tmp_path, "gpt_neox")
    raw = _config(paths, "ties", parameters={"normalize": True})
    for m in raw["models"]:
        m["parameters"]["density"] = 0.5
    result = check_config(parse_config(raw))
    assert result.model_type == "gpt_neox" and result.num_layers == 3 and result.vocab_size == V
    rep = run_merge(parse_config(raw), tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert on_disk["merge_path"] == "by_name" and on_disk["stacks"] == {"gpt_neox.layers.": 3}
    assert {r["name"] for r in rep["layers"]} == set(_tensors(paths["base"]))
    base, fts = _tensors(paths["base"]), [_tensors(p) for p in paths["fts"]]
    for r in rep["layers"]:
        n = base[r["name"]].size
        nonzero = [int(np.count_nonzero(f[r["name"]] != base[r["name"]])) for f in fts]
        if r["trim"] == "unchanged":
            assert nonzero == [0, 0]
            continue
        assert r["trim"] == "magnitude" and r["block"] == (
            int(r["name"].split(".")[2]) if r["name"].startswith("gpt_neox.layers.") else None
        )
        # the magnitude trim keeps round(0.5 n) entries, of which the nonzero ones count
        assert r["kept_density"] == [min(round(0.5 * n), z) / n for z in nonzero], r
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`gpt_neox`" in card and "`ties`" in card


def test_calibrated_trim_on_unregistered_architecture_names_it(tmp_path):
    paths = make_models(tmp_path, "opt")
    (tmp_path / "calib.txt").write_text("some text\n")
    raw = _config(paths, "ties", trim="sparsegpt", calibration={"data": str(tmp_path / "calib.txt")})
    _check_and_merge_refuse(raw, tmp_path / "out", "'opt'", "no Flax family", "llama", "data-free trim")
    raw["trim"] = "magnitude"  # calibration data a data-free merge cannot use here: merged by name, said so
    assert "calibration data unused" in check_config(parse_config(raw)).summary()


def test_orbax_output_refused_for_unregistered_architecture(tmp_path):
    paths = make_models(tmp_path, "opt")
    cfg = parse_config(_config(paths, "task_arithmetic"))
    with pytest.raises(ConfigError, match="'opt' has no Flax family.*--format hf"):
        run_merge(cfg, tmp_path / "out", format="orbax", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_check_and_merge_an_encoder_decoder(tmp_path, capsys):
    """`sgtv check` plans T5 from its headers (memory: the largest tensor's stack); `sgtv merge` writes it."""
    import yaml

    paths = make_models(tmp_path, "t5")
    raw = _config(paths, "task_arithmetic")
    cfgfile = tmp_path / "merge.yaml"
    cfgfile.write_text(yaml.safe_dump(raw))
    assert main(["check", str(cfgfile)]) == 0
    out = capsys.readouterr().out
    assert "OK: t5, 3 blocks, vocabulary 48" in out and "merged by tensor name" in out
    largest = max(v.size for v in _tensors(paths["base"]).values())  # the shared embedding [48, 16]
    from sgtv_jax.pipeline.memory import estimate_memory, human

    # merged whole (under the default budget): base, 2 task vectors, trimmed ones and temporaries, 12 + 20 T bytes
    assert estimate_memory(parse_config(raw)).total == (12 + 20 * 2) * largest == 52 * V * 16
    assert f"memory estimate: {human(52 * largest)} peak" in out and "formula: " in out
    assert main(["merge", str(cfgfile), str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["stacks"] == {"encoder.block.": 2, "decoder.block.": 3}
    _load("t5", tmp_path / "out")


def test_gguf_and_pytorch_bin_checkpoints(tmp_path):
    """The same by-name merge reads GGUF files (dequantised, HF names) and pickled pytorch_model.bin."""
    from tests.convert.test_convert_gguf import hf_tensors, write_gguf

    base = hf_tensors(tied=False, seed=0)
    rng = np.random.default_rng(1)
    fts = [{k: v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    paths = {
        "base": write_gguf(tmp_path / "base.gguf", base),
        "fts": [write_gguf(tmp_path / f"ft{t}.gguf", f) for t, f in enumerate(fts)],
    }
    run_merge(
        parse_config(_config(paths, "task_arithmetic", parameters={"lambda": 1.3})), tmp_path / "out", progress=False
    )
    got = _tensors(tmp_path / "out")
    assert set(got) == set(base)
    for name, b in base.items():
        b64 = b.astype(np.float64)
        deltas = [f[name].astype(np.float64) - b64 for f in fts]
        _assert_close(got[name], b64 + task_arithmetic_reference(deltas, [1.0, 0.7], 1.3), b64, deltas, name, 1.3)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"]

    fam = make_models(tmp_path / "falcon", "falcon")
    ft_bin = tmp_path / "falcon" / "ft1_bin"
    ft_bin.mkdir()
    shutil.copy(fam["fts"][1] / "config.json", ft_bin / "config.json")
    torch.save({k: torch.from_numpy(v) for k, v in _tensors(fam["fts"][1]).items()}, ft_bin / "pytorch_model.bin")
    raw = _config(fam, "task_arithmetic")
    run_merge(parse_config(raw), tmp_path / "from_st", progress=False)
    raw["models"][1]["model"] = str(ft_bin)
    run_merge(parse_config(raw), tmp_path / "from_bin", progress=False)
    a, b = _tensors(tmp_path / "from_st"), _tensors(tmp_path / "from_bin")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_safetensors_rows_read_only_their_range(tmp_path):
    """`get_rows` (the row reader a chunked merge uses) equals slicing the whole tensor, bf16 included."""
    import ml_dtypes

    from convert.errors import ConvertError
    from convert.safetensors_reader import SafetensorsCheckpoint

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((7, 3, 2)).astype(np.float32),
        "b": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.int64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    for name, arr in tensors.items():
        for r0, r1 in ((0, len(arr)), (1, 3), (len(arr) - 1, len(arr)), (2, 2)):
            got = ckpt.get_rows(name, r0, r1)
            assert got.dtype == arr.dtype and got.shape == arr[r0:r1].shape
            np.testing.assert_array_equal(got, arr[r0:r1])
    with pytest.raises(ConvertError, match="rows \\[3, 9\\) of tensor 'b'"):
        ckpt.get_rows("b", 3, 9)
    ckpt.close()
