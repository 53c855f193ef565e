"""convert.gguf_tokenizer: a GGUF's tokenizer rebuilt without torch, checked against transformers' GGUF loader.

transformers' own GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``)
needs torch; it is the independent reference here. The library side is also run in
a subprocess where torch cannot be imported, as on a machine without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import pytest

from convert import ConvertError
from convert.gguf_tokenizer import byte_to_unicode, read_tokenizer_spec, save_gguf_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[2]

TRAIN_TEXT = (
    "The year 2024 had 366 days; 1999 and 20000 did not. Hello, world! It's we'll they've. "
    "naïve café Ünïcødé 日本語 über   spaced\tout\n\nlines 3.14159 x=42 y+=7\n"
) * 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Control tokens, a user-defined one, and a "control" token written in raw text
# (a space is not in the byte alphabet): both loaders must leave that one to BPE.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<raw ctl>"]
USER_DEFINED = ["<think>"]
SAMPLES = [
    "Hello world",
    "  leading  and   runs\t\ttabs\n\n\nnewlines  ",
    "digits 2024-03-15 3.14159 1234567890 x=42",
    "Ünïcødé 日本語 emoji 🤖👍🏽 Привет naïve",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "it's we'll they've I'M",
    "",
    " ",
    "a<|im_end|>b<think>c<raw ctl>d",
]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def write_tokenizer_gguf(
    path: Path,
    *,
    pre: str = "default",
    model: str = "gpt2",
    add_bos: bool = True,
    merges: list[str] | None = None,
    bos_id: int | None = None,
) -> Path:
    """A llama-architecture GGUF holding only a byte-level BPE vocabulary trained on TRAIN_TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([TRAIN_TEXT], trainer)
    learned = json.loads(bpe.to_str())["model"]
    spell = byte_to_unicode()
    tokens = CONTROL + USER_DEFINED + sorted(learned["vocab"], key=learned["vocab"].get)
    types = [3] * len(CONTROL) + [4] * len(USER_DEFINED) + [1] * len(learned["vocab"])
    assert "".join(spell[b] for b in b"<raw ctl>") not in tokens  # its raw text really is unreachable by BPE

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges if merges is not None else [" ".join(m) for m in learned["merges"]])
    w.add_bos_token_id(1 if bos_id is None else bos_id)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_tokenizer(gguf_file: Path):
    pytest.importorskip("torch")  # transformers' GGUF metadata reader imports it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def assert_same_tokenizer(ours, ref) -> None:
    """Same ids (with and without special tokens), decoding, special tokens and chat template."""
    template = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == template
    for s in [*SAMPLES, template]:
        for special in (True, False):
            got = ours(s, add_special_tokens=special)["input_ids"]
            assert got == ref(s, add_special_tokens=special)["input_ids"], (s, special)
        assert ours.decode(got) == ref.decode(got) == s
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref) and ours.all_special_ids == ref.all_special_ids


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe", "qwen2"])
def test_tiny_gguf_tokenizer_equals_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    path = write_tokenizer_gguf(tmp_path / "tok.gguf", pre=pre)
    ref = transformers_gguf_tokenizer(path)
    save_gguf_tokenizer(path, tmp_path / "out")
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert_same_tokenizer(ours, ref)
    # add_bos_token is honoured: BOS leads every encoding with special tokens.
    assert ours("hi")["input_ids"][0] == 1 and ours("hi", add_special_tokens=False)["input_ids"][0] != 1
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


def test_pre_tokenizer_splits_differ_where_they_should(tmp_path):
    """llama3 keeps up to three digits together, qwen2 one: the split is really applied."""
    from transformers import AutoTokenizer

    got = {}
    for pre in ("llama-bpe", "qwen2"):
        save_gguf_tokenizer(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", pre=pre), tmp_path / pre)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / pre))
        got[pre] = tok.convert_ids_to_tokens(tok("2024", add_special_tokens=False)["input_ids"])
    assert got["qwen2"] == ["2", "0", "2", "4"]
    assert "".join(got["llama-bpe"]) == "2024" and len(got["llama-bpe"]) < 4


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(tmp_path):
    """The demo model's real GGUF (49152 tokens, ChatML template)."""
    from transformers import AutoTokenizer

    from convert import default_cache_dir, fetch_smollm2_gguf

    path = fetch_smollm2_gguf(default_cache_dir())
    ref = transformers_gguf_tokenizer(path)
    save_gguf_tokenizer(path, tmp_path)
    ours = AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same_tokenizer(ours, ref)
    assert ours.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>system\n")


def test_bad_metadata_is_named(tmp_path):
    bad = write_tokenizer_gguf(tmp_path / "m.gguf", merges=["a b", "lonely"])
    with pytest.raises(ConvertError, match=r"m\.gguf.*tokenizer\.ggml\.merges\[1\] = 'lonely'"):
        save_gguf_tokenizer(bad, tmp_path / "out1")
    far = write_tokenizer_gguf(tmp_path / "b.gguf", bos_id=10**6)
    with pytest.raises(ConvertError, match=r"b\.gguf.*bos_token_id = 1000000 is outside the vocabulary"):
        read_tokenizer_spec(far)
    assert not (tmp_path / "out1").exists()


NO_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` raises ModuleNotFoundError
import importlib, pkgutil
from pathlib import Path
import convert, sgtv_jax
for pkg in (sgtv_jax, convert):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith("__main__"):  # runs the CLI on import
            importlib.import_module(m.name)
from sgtv_jax.cli import main
from sgtv_jax.pipeline.demo import run_demo  # noqa: F401
from convert.demo import save_gguf_tokenizer
from convert import ConvertError
from transformers import AutoTokenizer
save_gguf_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(sys.argv[2])
print("IDS", tok("a<|im_end|>b 2024", add_special_tokens=False)["input_ids"])
try:
    save_gguf_tokenizer(Path(sys.argv[3]), Path(sys.argv[2]) / "x")
except ConvertError as e:
    print("REFUSED", e)
try:
    main(["demo", "--help"])
except SystemExit as e:
    print("HELP", e.code)
assert sys.modules["torch"] is None
"""


def test_library_cli_and_demo_tokenizer_without_torch(tmp_path):
    """Every module of sgtv_jax and convert imports, and the demo's tokenizer is built, with torch absent."""
    ok = write_tokenizer_gguf(tmp_path / "ok.gguf", pre="smollm")
    spm = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_TORCH), str(ok), str(tmp_path / "out"), str(spm)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(
        line.split(" ", 1) for line in res.stdout.splitlines() if line.split(" ", 1)[0] in ("IDS", "REFUSED", "HELP")
    )
    ref = transformers_gguf_tokenizer(ok)
    assert lines["IDS"] == str(ref("a<|im_end|>b 2024", add_special_tokens=False)["input_ids"])
    assert "spm.gguf" in lines["REFUSED"] and "'llama'" in lines["REFUSED"] and "needs torch" in lines["REFUSED"]
    assert lines["HELP"] == "0"
