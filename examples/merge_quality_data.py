"""The merge-quality benchmark's tasks and fine-tunes (`examples/merge_quality.py`), per seed.

A seed picks the train / calibration / evaluation split of every task and the
fine-tune's batch order; the pools the splits are drawn from are fixed.

* ``add``: 2-digit addition, the sum written least-significant digit first
  ("47+85=" -> "231" for 132): each answer digit then depends on two operand
  digits and one carry already written, the order a person adds in. Written
  most-significant first, 500 Adam steps on 3000 sums reached 0.50 exact match
  on unseen sums (the first digit needs the carry of the digits after it). 300
  steps of 16 at a peak of 1e-3 reached 0.30 at seed 0 (final loss 0.64), 800
  steps at 5e-4 (the recipe below) 0.98 (final loss 0.014);
* ``rev``: letter reversal ("Reverse: k q z m ->" -> " m z q k");
  the skill fine-tunes train on prompt + answer + newline: without the newline
  the model never learns where an answer ends, and a sum continued with more
  digits is a miss;
* ``code``: a synthetic Python text domain, scored by perplexity.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import optax

from sgtv_jax.pipeline.demo import _examples, finetune

TASKS = ("add", "rev", "code")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# items per split: train, calibration, evaluation (>= 200 evaluation items per task: an exact
# match of 0.9 is then known to about +-0.02, one binomial standard error). Calibration: about
# 2500 tokens per task (a sum is 10 tokens, a reversal 13, a snippet 43) so that no task's Grams
# are the thinnest by far; addition trains on every other sum of the 8100.
SIZES = {"add": (7644, 256, 200), "rev": (2000, 192, 200), "code": (200, 48, 200)}
# fine-tune recipe per task: Adam with linear warmup (5 % of the steps) and cosine decay to 5 %
# of the peak, on the top `top` decoder blocks; `--steps` overrides the steps
RECIPE_STAMP = "sgtv_finetune_recipe.json"  # in each fine-tune's folder: the recipe it was made with
RECIPES: dict[str, dict[str, Any]] = {
    "add": {"top": 8, "steps": 800, "lr": 5e-4, "batch": 16},
    "rev": {"top": 8, "steps": 250, "lr": 5e-4, "batch": 8},
    "code": {"top": 4, "steps": 120, "lr": 5e-4, "batch": 8},
}


def fail(msg: str) -> NoReturn:
    """A bad input or stale cache: one `error:` line, exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def split(items: list[Any], sizes: tuple[int, ...], seed: int, stream: int) -> list[list[Any]]:
    """Disjoint random subsets of `items` of the given sizes (train, calibration, eval)."""
    order = np.random.default_rng([seed, stream]).permutation(len(items))
    if sum(sizes) > len(items):
        raise ValueError(f"{sum(sizes)} items asked of a pool of {len(items)}")
    out, at = [], 0
    for n in sizes:
        out.append([items[i] for i in order[at : at + n]])
        at += n
    return out


def addition(sizes: tuple[int, ...], seed: int = 0) -> list[list[dict[str, str]]]:
    """2-digit sums as prompt/answer records, the answer's digits reversed (module doc)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return [
        [{"prompt": f"{a}+{b}=", "answer": str(a + b)[::-1]} for a, b in part] for part in split(pairs, sizes, seed, 0)
    ]


def reversal(sizes: tuple[int, ...], seed: int = 0) -> list[list[dict[str, str]]]:
    """4 distinct letters -> the same letters in reverse order."""
    rng = np.random.default_rng(1)  # the pool: fixed; the seed picks the split
    words = sorted({" ".join(rng.choice(list(LETTERS), 4, replace=False)) for _ in range(3 * sum(sizes))})
    return [
        [{"prompt": f"Reverse: {w} ->", "answer": " " + " ".join(reversed(w.split()))} for w in part]
        for part in split(words, sizes, seed, 1)
    ]


def code_snippets(sizes: tuple[int, ...], seed: int = 0) -> list[list[str]]:
    """Small Python functions: names, operators and constants drawn at random (a text domain)."""
    rng = np.random.default_rng(2)
    verbs, nouns = ("scale", "shift", "clip", "count", "merge", "parse"), ("items", "rows", "value", "total", "keys")
    out = set()
    while len(out) < sum(sizes):
        v, n, k = rng.choice(verbs), rng.choice(nouns), int(rng.integers(2, 50))
        op = ("+", "-", "*", "//")[int(rng.integers(4))]
        body = (
            f"def {v}_{n}({n}, k={k}):\n"
            f"    result = []\n"
            f"    for x in {n}:\n"
            f"        if x > {int(rng.integers(0, 9))}:\n"
            f"            result.append(x {op} k)\n"
            f"    return result\n"
        )
        out.add(body)
    return split(sorted(out), sizes, seed, 3)


def task_data(seed: int, eval_items: int | None = None) -> dict[str, list[Any]]:
    """`{task: [train, calibration, evaluation]}` for one seed (the first `eval_items` of each eval set)."""
    parts = {
        "add": addition(SIZES["add"], seed),
        "rev": reversal(SIZES["rev"], seed),
        "code": code_snippets(SIZES["code"], seed),
    }
    if eval_items is not None:
        for p in parts.values():
            p[2] = p[2][:eval_items]
    return parts


def _skill_examples(tok: Any, recs: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Ids / loss masks of prompt + answer + newline (loss on answer and newline), padded to the longest."""
    texts = [r["prompt"] + r["answer"] + "\n" for r in recs]
    plens = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in recs]
    seqlen = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return _examples(tok, texts, plens, seqlen)


def _text_examples(tok: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids / loss masks of whole texts (loss on every token), padded to the longest."""
    seqlen = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return _examples(tok, texts, [0] * len(texts), seqlen)


def calibration_text(task: str, part: list[Any]) -> str:
    """One task's calibration file: records one per line (snippets as they are)."""
    if task == "code":
        return "\n".join(part)
    return "\n".join(r["prompt"] + r["answer"] for r in part) + "\n"


def finetunes(
    base: Path, tok: Any, folder: Path, data: dict[str, list[Any]], seed: int, steps: int | None
) -> dict[str, Path]:
    """The three fine-tunes of one seed, cached in `folder/ft_TASK` with the recipe they were made with."""
    out = {}
    for t in TASKS:
        recipe = {**RECIPES[t], "seed": seed, "sizes": list(SIZES[t])}
        if steps:
            recipe["steps"] = steps
        out[t] = dst = folder / f"ft_{t}"
        stamp = dst / RECIPE_STAMP
        if dst.is_dir():
            if not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
                fail(f"{dst}: made with another recipe than {recipe}; delete it to redo it")
            continue
        train = data[t][0]
        ids, lm = _skill_examples(tok, train) if t != "code" else _text_examples(tok, train)
        n, peak = recipe["steps"], recipe["lr"]
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, max(n // 20, 1), n, peak * 0.05)
        t0 = time.perf_counter()
        finetune(base, dst, ids, lm, steps=n, lr=lr, batch=recipe["batch"], seed=seed, top_blocks=recipe["top"])
        stamp.write_text(json.dumps(recipe) + "\n")
        print(f"  seed {seed} ft_{t}: {recipe}: {time.perf_counter() - t0:.0f} s in all")
    return out
