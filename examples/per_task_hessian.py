"""Per-task vs shared Hessians for OBS trimming of task vectors (the seed's comparison).

    python examples/per_task_hessian.py [--work DIR] [--density 0.1]

Uses the two SmolLM2 fine-tunes of `examples/llama_domain_merge.py` (made and
cached in the same work directory) and merges them with TIES + SparseGPT under
each Hessian source:

* ``base``: one H per layer from the base model's inputs on shared data;
* ``per_task``: H_t from fine-tuned model t on task t's own data;
* ``merged``: one H from the merged-so-far model (sequential).

For each source it prints the mean relative reconstruction error of the trimmed
task vectors (`tr(E H E^T) / tr(D H D^T)` under the source's own H, from the
merge report) and the merged model's scores on both tasks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="llama_domain_merge_work")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()

    import llama_domain_merge as ldm

    from sgtv_jax.pipeline.config import parse_config
    from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge

    work = Path(args.work).absolute()
    prep = ldm.prepare(work, args.model_dir, args.steps)
    rows = {}
    for source in ldm.SOURCES:
        over = {"merge_method": "ties", "density": args.density, "trim": "sparsegpt", "hessian_source": source}
        out = work / "per_task_hessian" / f"ties_sparsegpt_d{args.density}_{source}"
        if not out.is_dir():
            run_merge(parse_config(ldm.config_for(prep, over, args.nsamples, args.seqlen)), out, progress=False)
        rep = json.loads((out / REPORT_FILE).read_text())
        errs = [np.mean(r["trim_error"]) for r in rep["layers"] if r["trim_error"] is not None]
        rows[source] = {
            "mean_trim_error": float(np.mean(errs)) if errs else float("nan"),
            **ldm.evaluate_dir(out, prep),
        }
    print(f"{'H source':<10}{'mean trim error':>18}{'facts EM':>10}{'logs ppl':>10}")
    for s, r in rows.items():
        print(f"{s:<10}{r['mean_trim_error']:>18.4f}{r['facts_em']:>10.3f}{r['logs_ppl']:>10.2f}")
    (work / "per_task_hessian.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
