"""`sgtv merge` outputs pinned bit for bit: a refactor of the merge path must not change one bit.

Each case merges the tiny random LLaMA / GPT-2 families of `tests.helpers.tiny_models`
with one configuration and hashes every output tensor (sha256 over the sorted
tensor names, each with its dtype, shape and raw bytes; never over files that
embed timings, such as merge_report.json). The expected digests are recorded
output of the code, not independent values: this file is a regression guard
for refactors that promise bit-identical results, not a correctness test; the
pipeline's correctness is checked against PyTorch and float64 oracles in
tests/pipeline/test_pipeline.py and tests/merge/.

Digests live in `digests/jax-<version>-<backend>-<machine>.json` next to this
file, one file per jax version, JAX backend and CPU architecture: another XLA
build, backend or architecture may round differently. A case passes when its
output equals one of the digests its file lists. Where no file or no entry for
the case exists yet (a new jax, a new backend, a new case), the test writes this
run's digest into the file and xfails with "recorded ...: commit this file"; under
CI (the `CI` environment variable set) it fails instead, since a CI checkout's
recording is lost. It never skips.

Within one file, the cases that solve linear systems (Cholesky / OBS / RegMean:
every calibrated case but Wanda's) round differently on CPUs with other vector
units, so a case may list one digest per recorded CPU (the file's `cpus` names
them); a CPU whose digest is not listed fails, as a changed output would. The
cases were first recorded from commit 7ae0603 (before splitting
pipeline/sequential.py) on an x86-64 CPU with jax 0.10.2, torch 2.13 and
transformers 5.24 (the test models and tokenizer come from torch's seeded
initialisation); a second digest was recorded from the same code (commit
86eb4fb) on an x86-64 "Intel Xeon Processor" with AVX-512, where the three
elementwise-only cases and Wanda's matched the first record and the other nine
did not. `gpt2_breadcrumbs_ties_trim_rules` was re-recorded when a bug was fixed (model 0
sets gamma 0.05 and model 1 none, and model 0's value used to be dropped; now
each model without a value takes the default on its own,
tests/merge/test_merge_paramspec.py). Every calibrated case but Wanda's was
re-recorded, on the AVX-512 machine only, when the Hessian became the same bit
for bit on any mesh: `batch_size` windows per device, chunk Grams summed in
window order (`sgtv_jax.pipeline.streams.HessianSum`) instead of a running mean;
the other CPU's digests of those cases are gone until someone records there.
The seven cases that run an OBS sweep (every `sparsegpt` trim but the bf16 orbax
one, whose bf16 output absorbs it) were re-recorded, on the AVX-512 machine, when
the sweep began carrying errors across blocks in recursively grouped matmuls
(`sgtv_jax.sweep`): the same float32 sums in another order, last-bit differences;
the masks still equal the float64 oracle's (tests/core/test_obs.py). An AVX-512
"AMD EPYC" was recorded from commit 77e70da (the merge path as at 196e913, which passed
on the Intel machine): the same four cases matched, the other nine did not.

To record this machine's digests on purpose (a new CPU, or an intended change of
the outputs), check out the commit before your change and run
`python -m tests.pipeline.test_merge_digests`: it adds this run's digests to the
file (keeping the other CPUs') and prints them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert import restore_orbax
from convert.architectures import get_architecture
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

os.environ["HF_HUB_OFFLINE"] = "1"


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over sorted names, each with dtype, shape and C-order bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def output_digest(out: Path, fmt: str) -> str:
    """Digest of a merge output directory's tensors (HF safetensors shards or an Orbax checkpoint)."""
    if fmt == "orbax":
        model, hf_cfg = restore_orbax(out)
        sd = get_architecture(hf_cfg["model_type"]).name_map.model_to_hf_state_dict(model)
        return tensors_digest({k: np.asarray(v) for k, v in sd.items()})
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors_digest(tensors)


def _data_free(cfg: dict) -> dict:
    cfg.pop("calibration")
    cfg["trim"] = None
    return cfg


def _ties_magnitude(cfg: dict, root: Path) -> dict:
    cfg = _data_free(cfg)
    cfg["models"][1]["parameters"]["density"] = 0.3
    return cfg


def _sparsegpt(source: str) -> Callable[[dict, Path], dict]:
    def build(cfg: dict, root: Path) -> dict:
        cfg["hessian_source"] = source
        if source == "per_task":  # model 1 calibrates on its own (JSONL) data
            cfg["models"][1]["calibration"] = {"data": str(root / "calib.jsonl"), "nsamples": 4, "seqlen": 16}
        return cfg

    return build


def _dare_ties(cfg: dict, root: Path) -> dict:
    cfg = _data_free(cfg)
    cfg.update(merge_method="dare_ties", seed=7, parameters={"lambda": 0.8})
    return cfg


def _nm_24(cfg: dict, root: Path) -> dict:
    cfg.update(prunen=2, prunem=4, hessian_source="base")
    return cfg


def _refit(cfg: dict, root: Path) -> dict:
    cfg.update(refit=True, hessian_source="base", percdamp=0.05)
    return cfg


def _regmean(cfg: dict, root: Path) -> dict:
    cfg.pop("trim")
    for m in cfg["models"]:
        m["parameters"] = {"weight": 1.0}
    cfg.update(merge_method="regmean", parameters={"alpha": 0.7})
    return cfg


def _della_gradient(cfg: dict, root: Path) -> dict:
    """Data-free DELLA: per-model epsilon, a density gradient over blocks and a filter rule for weight."""
    cfg = _data_free(cfg)
    cfg.update(merge_method="della", seed=3)
    cfg["models"][0]["parameters"] = {"density": [0.3, 0.7], "weight": 1.0, "epsilon": 0.1}
    cfg["models"][1]["parameters"] = {
        "density": 0.6,
        "epsilon": 0.2,
        "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}],
    }
    return cfg


def _wanda_dare_linear(cfg: dict, root: Path) -> dict:
    """Wanda on the linear layers (rescale off there), DARE's seeded random drop + rescale elsewhere."""
    cfg.update(merge_method="dare_linear", trim="wanda", seed=11, parameters={"lambda": 0.9})
    return cfg


def _breadcrumbs_rules(cfg: dict, root: Path) -> dict:
    """A trim per tensor by filter rules (sparsegpt on attention, magnitude elsewhere), gamma for model 0 only."""
    cfg.update(merge_method="breadcrumbs_ties", trim=[{"filter": "attn", "value": "sparsegpt"}, {"value": "magnitude"}])
    cfg["models"][0]["parameters"]["gamma"] = 0.05
    return cfg


def _orbax_ties(cfg: dict, root: Path) -> dict:
    cfg["dtype"] = "bfloat16"
    return cfg


# name: (family, config builder, output format)
CASES: dict[str, tuple[str, Callable[[dict, Path], dict], str]] = {
    "llama_ties_magnitude_data_free": ("llama", _ties_magnitude, "hf"),
    "llama_ties_sparsegpt_base": ("llama", _sparsegpt("base"), "hf"),
    "llama_ties_sparsegpt_per_task": ("llama", _sparsegpt("per_task"), "hf"),
    "llama_ties_sparsegpt_merged": ("llama", _sparsegpt("merged"), "hf"),
    "llama_dare_ties_seeded": ("llama", _dare_ties, "hf"),
    "llama_sparsegpt_2_4": ("llama", _nm_24, "hf"),
    "llama_sparsegpt_refit": ("llama", _refit, "hf"),
    "llama_regmean": ("llama", _regmean, "hf"),
    "llama_della_gradient_data_free": ("llama", _della_gradient, "hf"),
    "llama_ties_sparsegpt_orbax_bf16": ("llama", _orbax_ties, "orbax"),
    "gpt2_ties_sparsegpt_merged": ("gpt2", _sparsegpt("merged"), "hf"),
    "gpt2_wanda_dare_linear": ("gpt2", _wanda_dare_linear, "hf"),
    "gpt2_breadcrumbs_ties_trim_rules": ("gpt2", _breadcrumbs_rules, "hf"),
}

DIGESTS = Path(__file__).with_name("digests")


def digest_file() -> Path:
    """This run's record: one file per jax version, JAX backend and CPU architecture."""
    return DIGESTS / f"jax-{jax.__version__}-{jax.default_backend()}-{platform.machine()}.json"


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture: which CPU recorded a digest."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def load_digests(path: Path) -> dict[str, Any]:
    """The record at `path`, or an empty one for this jax version, backend and architecture."""
    if path.is_file():
        return json.loads(path.read_text())
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "cpus": [],
        "cases": {},
    }


def record_digest(path: Path, name: str, digest: str) -> None:
    """Add `digest` to case `name` in the record at `path` (kept sorted; rewritten whole, then renamed)."""
    data = load_digests(path)
    data["cases"].setdefault(name, [])
    if digest not in data["cases"][name]:
        data["cases"][name].append(digest)
    if cpu_name() not in data["cpus"]:
        data["cpus"].append(cpu_name())
    data["cases"] = dict(sorted(data["cases"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_case(name: str, family_paths: dict[str, Any], root: Path, out: Path) -> str:
    family, build, fmt = CASES[name]
    cfg = parse_config(build(H.config_dict(family_paths, root), root))
    run_merge(cfg, out, format=fmt, progress=False)
    return output_digest(out, fmt)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for fam in ("llama", "gpt2"):
        root = tmp_path_factory.mktemp(fam)
        out[fam] = (root, H.make_family(root, fam))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_merge_output_is_bit_identical_to_the_recorded_digest(name, families, tmp_path):
    family = CASES[name][0]
    root, paths = families[family]
    digest = run_case(name, paths, root, tmp_path / "out")
    path = digest_file()
    recorded = load_digests(path)["cases"].get(name)
    if recorded is None:
        record_digest(path, name, digest)
        message = f"no digest of {name} for this jax, backend and CPU: recorded {path}: commit this file"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.xfail(message)
    assert digest in recorded, (
        f"{name}: output digest {digest} is none of those recorded in {path}; if only this CPU rounds "
        "differently, record it from the commit before your change (see the module docstring)"
    )


if __name__ == "__main__":  # record this machine's digests of the current code, and print them
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        fams = {}
        for fam in ("llama", "gpt2"):
            r = Path(d) / fam
            fams[fam] = (r, H.make_family(r, fam))
        for case, (fam, _, _) in CASES.items():
            r, p = fams[fam]
            digest = run_case(case, p, r, Path(d) / "out" / case)
            record_digest(digest_file(), case, digest)
            print(f"{case}: {digest}", flush=True)
    print(f"recorded in {digest_file()}")
