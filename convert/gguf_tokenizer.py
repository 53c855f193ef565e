"""A Hugging Face tokenizer rebuilt from a GGUF file's metadata, without torch.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary, the BPE
merges, each token's type and the special token ids as metadata
(``tokenizer.ggml.*``). For byte-level BPE vocabularies (``tokenizer.ggml.model
== "gpt2"``: SmolLM2, Qwen2, LLaMA 3, ...) this module reads them with the
``gguf`` package and assembles the equivalent ``tokenizers.Tokenizer``::

    save_gguf_tokenizer("model.gguf", "out/")   # tokenizer.json, tokenizer_config.json, ...
    AutoTokenizer.from_pretrained("out/")

Other vocabularies (sentencepiece ``llama``, ``t5``, ...) are built by
transformers' own GGUF loader, which needs torch; without torch they are
refused with a message naming the file and the tokenizer type.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from convert.errors import ConvertError
from sgtv_jax import numparse

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer splits by `tokenizer.ggml.pre`. None: GPT-2's own regex, which
# the ByteLevel pre-tokenizer applies itself.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerSpec:
    """The tokenizer metadata of one GGUF file (token ids index `tokens`)."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def read_tokenizer_spec(gguf_file: str | Path) -> GGUFTokenizerSpec:
    """Read the ``tokenizer.*`` metadata of `gguf_file` (a clear error if it has none)."""

    path = Path(gguf_file)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors/etc.
        raise ConvertError(f"{path}: not a readable GGUF file ({e})") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens (no tokenizer to build)")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConvertError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    def token_id(key: str) -> int | None:
        v = field(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        why = numparse.problem(v, integer=True, lo=0, hi=len(tokens) - 1)
        if why is not None:  # a string or an id past the vocabulary: named, not a ValueError / IndexError
            raise ConvertError(
                f"{path}: tokenizer.ggml.{key} = {numparse.show(v)} is outside the vocabulary of {len(tokens)} ({why})"
            )
        return int(v)

    return GGUFTokenizerSpec(
        model=str(field("tokenizer.ggml.model", "")),
        pre=str(field("tokenizer.ggml.pre", "default")),
        tokens=list(tokens),
        token_types=[int(t) for t in types],
        merges=list(field("tokenizer.ggml.merges") or []),
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        unk_id=token_id("unknown_token_id"),
        pad_id=token_id("padding_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(field("tokenizer.ggml.add_eos_token", False)),
        chat_template=field("tokenizer.chat_template"),
    )


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, ...) take the characters from U+0100 upward, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def supports(spec: GGUFTokenizerSpec) -> bool:
    """Whether :func:`build_tokenizer` handles this vocabulary (byte-level BPE with a known split)."""
    return spec.model == "gpt2" and spec.pre in PRE_TOKENIZER_SPLITS


def build_tokenizer(spec: GGUFTokenizerSpec, source: str = "GGUF") -> Any:
    """The ``tokenizers.Tokenizer`` a byte-level BPE `spec` describes; `source` names it in errors."""

    if not supports(spec):
        raise ConvertError(
            f"{source}: tokenizer {spec.model!r} with pre-tokenizer {spec.pre!r} is not supported "
            f"here (byte-level 'gpt2' with one of {', '.join(sorted(PRE_TOKENIZER_SPLITS))})"
        )
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())

    def spell(token: str) -> str:
        # Byte-level vocabularies store tokens in the byte alphabet already; a token
        # written in raw text (e.g. a user-defined "<think>\n") is respelled byte by byte.
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(spec.tokens)}
    merges = []
    for j, m in enumerate(spec.merges):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ConvertError(f"{source}: tokenizer.ggml.merges[{j}] = {m!r} is not two tokens separated by a space")
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS[spec.pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) match whole and are special; user-defined
    # ones match whole but are ordinary text. An added token is looked up in the
    # vocabulary by its text, so one whose text is not spelled in the byte alphabet
    # would get a new id past the model's vocabulary: such tokens are left to BPE.
    whole = [(t, ty) for t, ty in zip(spec.tokens, spec.token_types) if set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in whole if ty == CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in whole if ty == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    bos = spec.tokens[spec.bos_id] if spec.add_bos and spec.bos_id is not None else None
    eos = spec.tokens[spec.eos_id] if spec.add_eos and spec.eos_id is not None else None
    single = [*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])]
    pair = [*single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    special = [(t, vocab[spell(t)]) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok


def _save_with_transformers(gguf_file: Path, dst: Path, spec: GGUFTokenizerSpec) -> None:
    """Vocabularies we do not build: transformers' GGUF loader (it needs torch)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)
    from transformers.utils import is_torch_available  # noqa: PLC0415 (as above)

    if not is_torch_available():
        raise ConvertError(
            f"{gguf_file}: its tokenizer ({spec.model!r}, pre-tokenizer {spec.pre!r}) is built by "
            f"transformers' GGUF loader, which needs torch (pip install torch); byte-level "
            f"'gpt2' vocabularies with pre-tokenizer {', '.join(sorted(PRE_TOKENIZER_SPLITS))} "
            f"need nothing more"
        )
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from the file
    # ... and only from it: transformers also looks for tokenizer files beside it
    # (tokenizer.json, tokenizer_config.json), so it gets a folder holding the GGUF alone.
    with tempfile.TemporaryDirectory(prefix="sgtv-gguf-") as alone:
        os.symlink(os.path.realpath(gguf_file), Path(alone) / gguf_file.name)
        try:
            tok = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name)
        except Exception as e:  # noqa: BLE001 - its GGUF loader raises Value/Key/Type errors on odd metadata
            reason = " ".join(str(e).split())[:300]
            raise ConvertError(
                f"{gguf_file}: transformers cannot build its tokenizer (tokenizer.ggml.model {spec.model!r}): {reason}"
            ) from None
        tok.save_pretrained(str(dst))


def save_gguf_tokenizer(gguf_file: str | Path, dst: str | Path) -> None:
    """Write the tokenizer of `gguf_file` (and a generation config from its special tokens) into `dst`.

    `dst` then loads with ``transformers.AutoTokenizer.from_pretrained``. Offline:
    everything comes from the file.
    """
    from transformers import GenerationConfig, PreTrainedTokenizerFast  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)

    gguf_file, dst = Path(gguf_file), Path(dst)
    spec = read_tokenizer_spec(gguf_file)

    def text(i: int | None) -> str | None:
        return None if i is None else spec.tokens[i]

    if supports(spec):
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(spec, str(gguf_file)),
            bos_token=text(spec.bos_id),
            eos_token=text(spec.eos_id),
            unk_token=text(spec.unk_id),
            pad_token=text(spec.pad_id),
            add_bos_token=spec.add_bos,
            add_eos_token=spec.add_eos,
            chat_template=spec.chat_template,
        )
        fast.save_pretrained(str(dst))
    else:
        _save_with_transformers(gguf_file, dst, spec)
    ids = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(dst))
