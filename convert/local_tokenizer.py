"""A model folder's tokenizer, loaded by `transformers` from contained files only.

``AutoTokenizer.from_pretrained(folder)`` opens whichever files it finds there
(tokenizer.json, tokenizer_config.json, vocabularies, chat templates,
config.json, ``additional_chat_templates/``), following symlinks wherever they
point. So it never sees the folder itself: every file it might read is
checked with ``convert.containment.contained_file`` (a symlink out of the
folder is refused by name) and copied into a private temporary folder, which
is what transformers loads. Files of other kinds (weights, README) are not
copied, so they cannot be read either.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from convert.containment import contained_file
from convert.errors import ConvertError

TEMPLATE_DIR = "additional_chat_templates"
# Every file a tokenizer may be made of: by suffix, or by the stems transformers
# looks for with other suffixes (tokenizer.model.v3, tekken.json, vocab.bpe, ...).
_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".bpe")
_STEMS = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "tekken", "tiktoken")
# Files of model folders no tokenizer is made of: neither copied nor digested, so a fine-tune's own
# generation settings, a shard index or a report of ours does not make its tokenizer another one.
_NOT_TOKENIZER = (
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "merge_report.json",
    "lora_report.json",
)
_OURS = "sgtv_"  # sgtv_model.json, sgtv_finetune_recipe.json, ...


def tokenizer_file_names(directory: str | Path) -> list[str]:
    """Names (relative to `directory`) of the files a tokenizer of `directory` may be read from."""
    d = Path(directory)
    names = [
        p.name
        for p in d.iterdir()
        if (p.suffix in _SUFFIXES or p.name.startswith(_STEMS))
        and p.name not in _NOT_TOKENIZER
        and not p.name.startswith(_OURS)
        and p.is_file()
    ]
    if (d / TEMPLATE_DIR).is_dir():
        names += [f"{TEMPLATE_DIR}/{p.name}" for p in (d / TEMPLATE_DIR).iterdir() if p.suffix == ".jinja"]
    return sorted(names)


def tokenizer_digest(directory: str | Path) -> str:
    """A digest of what `load_local_tokenizer(directory)` reads: folders with equal digests load equal tokenizers.

    The bytes of every tokenizer file, except config.json, of which only the two
    fields transformers reads to choose a tokenizer class count (`model_type`,
    `tokenizer_class`): a fine-tune saved with its base's tokenizer files has its
    base's digest whatever else its config says. ConvertError as `load_local_tokenizer`.
    """
    d = Path(directory)
    h = hashlib.sha256()
    for name in tokenizer_file_names(d):
        data = contained_file(d, name, what=f"tokenizer file {name}").read_bytes()
        if name == "config.json":
            try:
                cfg = json.loads(data)
                data = json.dumps([cfg.get("model_type"), cfg.get("tokenizer_class")]).encode()
            except (ValueError, AttributeError):  # not a JSON object: its bytes count
                pass
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def load_local_tokenizer(directory: str | Path) -> Any:
    """The `transformers` tokenizer of model folder `directory`, from its contained files only (module doc).

    ConvertError naming the file when one leaves the folder, naming the folder
    when the files do not make a tokenizer.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)

    d = Path(directory)
    if not d.is_dir():
        raise ConvertError(f"{d}: not a directory (a tokenizer is read from a model folder)")
    with tempfile.TemporaryDirectory(prefix="sgtv-tokenizer-") as tmp:
        for name in tokenizer_file_names(d):
            real = contained_file(d, name, what=f"tokenizer file {name}")
            (Path(tmp) / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(real, Path(tmp) / name)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any reason the files do not load: say which folder
            why = str(e).replace(tmp, str(d))  # the folder the user named, not our copy
            raise ConvertError(f"{d}: its tokenizer files do not load ({type(e).__name__}: {why})") from None
    tok.name_or_path = str(d)  # as named, not the temporary folder (never saved: save_pretrained drops it)
    return tok
