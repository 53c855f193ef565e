"""Tiny local models for the pipeline tests (no hub): a BPE tokenizer, random LLaMA / GPT-2, fine-tunes.

Not a test module (no tests); imported as `from tests.helpers import tiny_models as H`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXT = (
    "The quick brown fox jumps over the lazy dog. A merge of task vectors keeps what each task "
    "learned. Calibration text flows through the network block by block, and every linear layer "
    "sees its inputs. Numbers like 12, 345 and 6789 appear too; so do words such as hessian, "
    "damping, sparsity and density. "
) * 6


LAYERS = 3  # decoder layers of every tiny model (make_family's `layers` overrides it)


def make_tokenizer(dst: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained on TEXT, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(dst))


def flax_llama_config(vocab_size: int, blocks: int):
    """A tiny Flax `LlamaConfig` (hidden 16, 2 heads, 1 KV head) for tests that build `sgtv_jax.models` directly."""
    from sgtv_jax.models.common import rope_inv_freq
    from sgtv_jax.models.llama import LlamaConfig

    inv, scaling = rope_inv_freq(8, {"rope_theta": 10000.0})
    return LlamaConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_inv_freq=inv,
        rope_attention_scaling=scaling,
    )


def tiny_config(arch: str, vocab_size: int):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            eos_token_id=0,
            pad_token_id=1,
            bos_token_id=0,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, eos_token_id=0, bos_token_id=0
        )
    small = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=0,
    )
    if arch == "qwen3":
        return transformers.Qwen3Config(**small, tie_word_embeddings=False)
    if arch == "phi3":
        return transformers.Phi3Config(**{k: v for k, v in small.items() if k != "head_dim"})
    if arch in ("gemma2", "gemma3_text"):
        # sliding window 6 < seqlen 24: the alternating local / global layers differ on these windows
        cls = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
        return cls(**small, sliding_window=6, query_pre_attn_scalar=8)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**small, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # with a gated shared expert; routing weights not renormalised (norm_topk_prob False)
        return transformers.Qwen2MoeConfig(
            **small, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2
        )
    if arch == "mixtral":  # intermediate_size is each expert's width
        return transformers.MixtralConfig(
            **{**small, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2
        )
    raise ValueError(arch)


def save_model(model, dst: Path, tokenizer_dir: Path) -> Path:
    import shutil

    model.save_pretrained(str(dst), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


def make_family(
    root: Path, arch: str, *, tasks: int = 2, scale: float = 0.02, seed: int = 0, layers: int | None = None
) -> dict:
    """Base + `tasks` fine-tunes (base + dense random perturbation), as HF dirs; returns their paths.

    `layers`: decoder layers (default `LAYERS`).
    """
    import torch
    import transformers

    root.mkdir(parents=True, exist_ok=True)
    tokdir = root / "tokenizer"
    make_tokenizer(tokdir)
    vocab = len(json.loads((tokdir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab)
    if layers is not None:
        cfg.num_hidden_layers = layers  # GPT-2's config maps it to n_layer
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    paths = {"base": save_model(base, root / "base", tokdir), "fts": []}
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(tasks):
        ft = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        paths["fts"].append(save_model(ft, root / f"ft{t}", tokdir))
    (root / "calib.txt").write_text(TEXT)
    rows = [{"text": s.strip() + "."} for s in TEXT.split(".")[:8] if s.strip()]
    (root / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def config_dict(paths: dict, root: Path, **over) -> dict:
    cfg = {
        "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1.0}} for p in paths["fts"]],
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "parameters": {"normalize": True},
        "dtype": "float32",
        "trim": "sparsegpt",
        "calibration": {"data": str(root / "calib.txt"), "nsamples": 6, "seqlen": 24, "seed": 0},
        "hessian_source": "merged",
        "blocksize": 16,
        "batch_size": 4,
    }
    cfg.update(over)
    return cfg


def merge_yaml(root: Path, name: str, cfg: dict) -> dict:
    """Write `cfg` to `root/name.yaml`, run `sgtv merge` on it into `root/name`; the merged tensors by name."""
    import yaml
    from safetensors.numpy import load_file

    from sgtv_jax.cli import main

    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / f"{name}.yaml"), str(root / name), "--quiet"]) == 0
    return load_file(str(root / name / "model.safetensors"))


def torch_hessians(
    model, input_ids: np.ndarray, mask: np.ndarray, layer_prefix: str, linear_names: list[str]
) -> dict[str, np.ndarray]:
    """H = (2/n) sum x x^T of each named linear's input in one block, by forward hooks (float64)."""
    import torch

    acc: dict[str, list] = {n: [] for n in linear_names}
    hooks = []
    mods = dict(model.named_modules())
    for n in linear_names:

        def hook(mod, inp, out, n=n):
            acc[n].append(inp[0].detach().double())

        hooks.append(mods[layer_prefix + n].register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(mask).long())
    for h in hooks:
        h.remove()
    out = {}
    m = torch.from_numpy(mask).double()
    for n, xs in acc.items():
        x = xs[0].reshape(*mask.shape, -1) * m[..., None]  # MoE blocks run their MLP on [B*S, D]
        x = x.reshape(-1, x.shape[-1])
        out[n] = (2.0 / input_ids.shape[0] * x.T @ x).numpy()
    return out


def read_card(path: Path) -> tuple[dict, object]:
    """A README.md card's front matter (parsed back with yaml.safe_load) and its ```yaml config block (None: none)."""
    import re

    import yaml

    from convert.model_card import read_front_matter

    text = Path(path).read_text()
    meta = read_front_matter(text)
    assert meta, f"{path}: no YAML front matter between '---' lines at the top"
    block = re.search(r"## Configuration\n.*?```yaml\n(.*?)```", text, re.S)
    return meta, (yaml.safe_load(block.group(1)) if block else None)


def assert_hub_card(meta: dict, base_models: list[str], method: str) -> None:
    """The Hub's keys: the base and merged models as written, the merge relation, the library, the tags."""
    assert meta["base_model"] == base_models, meta
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers", meta
    assert {"merge", "sgtv-jax", method} <= set(meta["tags"]), meta
