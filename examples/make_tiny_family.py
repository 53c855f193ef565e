"""Build a tiny random base model and fine-tunes of one architecture, locally (no hub), for trying `sgtv merge`.

    python examples/make_tiny_family.py qwen3 examples/configs/tiny-qwen3

writes ``base/``, ``ft_a/``, ``ft_b/`` (Hugging Face directories sharing a small
byte-level BPE tokenizer) and ``calibration.txt`` into the folder, the layout
``examples/configs/qwen3_ties_sparsegpt.yaml`` names. The fine-tunes are the
base plus a dense random perturbation (standard deviation ``--scale``), so the
merge has task vectors to trim; the numbers mean nothing beyond that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = (
    "Task vectors are the differences between a fine-tuned model and its base. Merging adds several of "
    "them back to the base after trimming each one. SparseGPT trims a linear layer's task vector with the "
    "inverse Hessian of its inputs, so the entries it drops cost the least output error on calibration "
    "text like this one. Numbers such as 7, 42 and 1024 appear too, and words like density and damping. "
) * 8

FAMILIES = ("qwen3", "gemma3_text", "qwen3_moe", "llama")


def tiny_config(family: str, vocab_size: int) -> transformers.PretrainedConfig:
    """A few-layer config of ``family`` (hidden 64, 4 heads), ids of the tokenizer's special tokens."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if family == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=False)
    if family == "llama":  # the input `sgtv moe` turns into Mixtral / Qwen2-MoE
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "gemma3_text":
        # Layers 0-2 attend within 16 tokens, layer 3 globally (every fourth).
        return transformers.Gemma3TextConfig(
            **common,
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def make_tokenizer(dst: Path, vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TEXT (token 0 ``<eos>``, 1 ``<pad>``), saved into ``dst``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(dst))
    return fast


def make_family(family: str, root: Path, *, tasks: int = 2, scale: float = 0.02, seed: int = 0) -> dict[str, Path]:
    """Write base + ``tasks`` fine-tunes + calibration.txt into ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(root / "base")
    cfg = tiny_config(family, len(tokenizer))
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    base.save_pretrained(str(root / "base"))
    gen = torch.Generator().manual_seed(seed + 1)
    paths = {"base": root / "base"}
    for t in range(tasks):
        name = f"ft_{chr(ord('a') + t)}"
        ft = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        ft.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
        paths[name] = root / name
    paths["calibration"] = root / "calibration.txt"
    paths["calibration"].write_text(TEXT)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("out", type=Path, help="folder for base/, ft_a/, ft_b/ and calibration.txt")
    p.add_argument("--scale", type=float, default=0.02, help="std of the fine-tunes' random perturbation")
    args = p.parse_args(argv)
    for name, path in make_family(args.family, args.out, scale=args.scale).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
