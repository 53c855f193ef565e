"""Write a tiny LLaMA base and two fine-tunes with numpy only, for CI's installed-wheel merge.

    python .ci/tiny_family.py DIR          # write the models and DIR/merge.yaml
    python .ci/tiny_family.py DIR OUT      # check `sgtv merge merge.yaml OUT`'s result

writes ``DIR/base``, ``DIR/ft_a``, ``DIR/ft_b`` (config.json + model.safetensors)
and ``DIR/merge.yaml`` (task_arithmetic of the two, weight 0.5 each); the check
compares OUT's tensors with base + 0.5 (ft_a - base) + 0.5 (ft_b - base)
computed here. The wheel's environment has
no torch, so examples/make_tiny_family.py (which builds models with transformers'
PyTorch classes) cannot run there; the tensor names below are transformers'
LlamaForCausalLM layout, written independently of the package under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 64

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "dtype": "float32",
}


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of an untied LlamaForCausalLM (HF names, HF (out, in) layout).

    The one table of it: examples/benchmarks/bench_convert.py loads it from here.
    """
    hd = hidden // heads
    out = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return out


def shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of LlamaForCausalLM for CONFIG."""
    return llama_shapes(VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS)


def write_model(dst: Path, tensors: dict[str, np.ndarray]) -> None:
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(CONFIG, indent=2))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def main(root: Path) -> None:
    rng = np.random.default_rng(0)
    base = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes().items()}
    write_model(root / "base", base)
    for name in ("ft_a", "ft_b"):  # base + a small dense task vector
        write_model(
            root / name, {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
        )
    models = "".join(f"  - model: {n}\n    parameters: {{weight: 0.5}}\n" for n in ("ft_a", "ft_b"))
    (root / "merge.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: base\nmodels:\n{models}dtype: float32\n"
    )


def check(root: Path, out: Path) -> None:
    """Exit 1 unless OUT holds config.json and the expected task-arithmetic tensors."""
    if not (out / "config.json").is_file():
        sys.exit(f"{out}: no config.json")
    merged = load_file(str(out / "model.safetensors"))
    base, a, b = (load_file(str(root / n / "model.safetensors")) for n in ("base", "ft_a", "ft_b"))
    if set(merged) != set(base):
        sys.exit(f"{out}: tensors {sorted(set(merged) ^ set(base))} differ from the base's")
    for k, v in base.items():
        want = v + 0.5 * (a[k] - v) + 0.5 * (b[k] - v)
        if merged[k].shape != want.shape or not np.allclose(merged[k], want, rtol=0, atol=1e-6):
            sys.exit(f"{out}: {k} is not base + 0.5 (ft_a - base) + 0.5 (ft_b - base)")
    print(f"{out}: {len(merged)} tensors as expected")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        check(Path(sys.argv[1]), Path(sys.argv[2]))
