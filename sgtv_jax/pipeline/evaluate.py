"""`sgtv eval MODEL_DIR`: perplexity on text, greedy exact match on prompt/answer JSONL.

Runs our Flax model (`sgtv_jax.models`) on any supported HF directory.

* perplexity: the text is tokenised (no special tokens) and cut into
  non-overlapping windows of `seqlen` tokens (the last one shorter, padded and
  masked); `exp(mean NLL)` over every predicted token (each window's first
  token has no context and is not predicted).
* exact match: for each `{"prompt", "answer"}` record, greedy decoding of
  `len(tokens(answer)) + 2` tokens after the prompt; a hit when the generated
  text, stripped, starts with the stripped answer and the next character (if
  any) is not alphanumeric. Prompts are batched right-padded: with causal
  attention the padding after a prompt never influences its next token.
* forced exact match (`forced_exact_match`): the same greedy decision in one
  forward pass per batch instead of one per generated token. Greedy decoding
  emits the answer's tokens exactly when, fed prompt + answer, the argmax at
  each answer position is the next answer token; the argmax after the answer is
  the token greedy decoding emits next, and the decoded answer plus that token
  is scored by the same rule. It differs from `exact_match` only when greedy
  decoding spells the answer with other tokens (then forced counts a miss) or
  emits further tokens after a special one (forced stops there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.conversion import load_flax_model
from sgtv_jax.errors import SgtvError
from sgtv_jax.models import forward_blockwise
from sgtv_jax.pipeline.calibration import jsonl_records, load_tokenizer, read_text


class EvalError(SgtvError):
    """Bad evaluation input (names the file and line)."""


def load_model(model_dir: str | Path) -> tuple[Any, Any]:
    """(Flax model, tokenizer) of an HF directory."""

    model, _ = load_flax_model(str(model_dir))
    return model, load_tokenizer(model_dir)


def _logits(model: Any, ids: np.ndarray, mask: np.ndarray | None) -> jax.Array:

    return forward_blockwise(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


@jax.jit
def _nll(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed NLL of tokens 1.. given their prefix, and the count; logits `[B,S,V]`."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = ids[:, 1:]
    m = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * m), jnp.sum(m)


def perplexity(model: Any, tokenizer: Any, text: str, *, seqlen: int = 256, batch_size: int = 8) -> float:
    """Perplexity of `text` over non-overlapping windows of `seqlen` tokens."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    if len(ids) < 2:
        raise EvalError("perplexity needs a text of at least 2 tokens")
    n = -(-len(ids) // seqlen)
    win = np.zeros((n, seqlen), np.int32)
    mask = np.zeros((n, seqlen), np.int32)
    for w in range(n):
        chunk = ids[w * seqlen : (w + 1) * seqlen]
        win[w, : len(chunk)], mask[w, : len(chunk)] = chunk, 1
    total, count = 0.0, 0.0
    for s in range(0, n, batch_size):
        b_ids, b_mask = win[s : s + batch_size], mask[s : s + batch_size]
        nll, c = _nll(_logits(model, b_ids, b_mask), jnp.asarray(b_ids), jnp.asarray(b_mask))
        total, count = total + float(nll), count + float(c)
    return float(np.exp(total / max(count, 1.0)))


def read_qa(path: str | Path) -> list[dict[str, str]]:
    """`{"prompt", "answer"}` records of a JSONL file (`EvalError` naming the line)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{p}: no such file")
    out = []
    for ln, rec in jsonl_records(p, read_text(p), EvalError):
        if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
            raise EvalError(f"{p}:{ln}: needs 'prompt' and 'answer'")
        out.append({"prompt": str(rec["prompt"]), "answer": str(rec["answer"])})
    if not out:
        raise EvalError(f"{p}: no records")
    return out


def is_match(generated: str, answer: str) -> bool:
    """Exact-match rule (module doc)."""
    g, a = generated.strip(), answer.strip()
    return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())


def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy continuations (decoded text) of `prompts`, `new_tokens` tokens each."""
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    total = max(len(e) for e in enc) + new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    outs: list[str] = []
    for s in range(0, len(enc), batch_size):
        batch = enc[s : s + batch_size]
        ids = np.full((batch_size, total), pad, np.int32)  # fixed shape: one compilation
        lens = np.ones(batch_size, np.int64)
        for r, e in enumerate(batch):
            ids[r, : len(e)] = e
            lens[r] = len(e)
        start = lens.copy()
        for _ in range(new_tokens):
            logits = _logits(model, ids, None)
            nxt = np.asarray(jnp.argmax(logits[jnp.arange(batch_size), jnp.asarray(lens - 1)], axis=-1))
            ids[np.arange(batch_size), lens] = nxt
            lens += 1
        for r in range(len(batch)):
            outs.append(tokenizer.decode(ids[r, start[r] : lens[r]].tolist(), skip_special_tokens=True))
    return outs


def exact_match(
    model: Any, tokenizer: Any, records: Sequence[dict[str, str]], *, batch_size: int = 32, extra_tokens: int = 2
) -> tuple[float, list[str]]:
    """(accuracy, generations) of greedy decoding against the records' answers."""
    k = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records) + extra_tokens
    gens = greedy_generate(model, tokenizer, [r["prompt"] for r in records], k, batch_size)
    hits = [is_match(g, r["answer"]) for g, r in zip(gens, records)]
    return float(np.mean(hits)), gens


def forced_exact_match(
    model: Any, tokenizer: Any, records: Sequence[dict[str, str]], *, batch_size: int = 64
) -> tuple[float, list[str]]:
    """(accuracy, decoded greedy continuations up to one token past the answer), teacher-forced (module doc).

    Rows are right-padded to one `[batch_size, S]` shape (S: longest prompt + answer), one compilation.
    """
    pairs = [
        (
            tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(r["answer"], add_special_tokens=False)["input_ids"],
        )
        for r in records
    ]
    total = max(len(p) + len(a) for p, a in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    hits: list[bool] = []
    gens: list[str] = []
    for s in range(0, len(pairs), batch_size):
        batch = pairs[s : s + batch_size]
        ids = np.full((batch_size, total), pad, np.int32)
        for r, (p, a) in enumerate(batch):
            ids[r, : len(p) + len(a)] = p + a
        pred = np.asarray(jnp.argmax(_logits(model, ids, None), axis=-1))  # [B, S]: greedy next token at each position
        for r, (p, a) in enumerate(batch):
            got = pred[r, len(p) - 1 : len(p) + len(a)].tolist()  # predictions of the answer tokens and the one after
            k = next((j for j in range(len(a)) if got[j] != a[j]), len(a))
            # greedy emits got[:k+1]: the answer's first k tokens, then its own choice
            gens.append(tokenizer.decode(a[:k] + got[k : k + 1], skip_special_tokens=True))
            hits.append(k == len(a) and is_match(gens[-1], records[s + r]["answer"]))
    return float(np.mean(hits)), gens


def evaluate(
    model_dir: str | Path,
    *,
    text: str | Path | None = None,
    jsonl: str | Path | None = None,
    seqlen: int = 256,
    batch_size: int = 8,
) -> dict[str, float]:
    """`{"perplexity": ..., "exact_match": ...}` for the files given."""
    if text is None and jsonl is None:
        raise EvalError("give --text FILE and/or --jsonl FILE")
    for f in (text, jsonl):  # before the (slow) model load
        if f is not None and not Path(f).is_file():
            raise EvalError(f"{f}: no such file")
    model, tok = load_model(model_dir)
    out: dict[str, float] = {}
    if text is not None:
        try:
            out["perplexity"] = perplexity(model, tok, read_text(text), seqlen=seqlen, batch_size=batch_size)
        except EvalError as e:
            raise EvalError(f"{text}: {e}") from None
    if jsonl is not None:
        out["exact_match"], _ = exact_match(model, tok, read_qa(jsonl))
    return out
