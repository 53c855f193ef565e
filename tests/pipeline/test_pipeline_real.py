"""Real SmolLM2-135M layers: TIES + SparseGPT at density 0.1 reconstructs better than magnitude TIES.

Hessians come from the real model's calibration activations (the pipeline's own
capture path); task vectors are fine-tune-like (low rank plus dense noise,
about 1% of the weights' scale).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from convert import default_cache_dir, fetch_smollm2, open_checkpoint
from sgtv_jax.pipeline.arch import arch_of
from sgtv_jax.pipeline.calibration import load_tokenizer, token_stream, windows
from sgtv_jax.pipeline.mesh import make_mesh
from sgtv_jax.pipeline.report import relative_errors
from sgtv_jax.pipeline.sequential import merge_tensor
from sgtv_jax.pipeline.streams import capture, embed_stream

README = __import__("pathlib").Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="session")
def smollm2_dir():
    return fetch_smollm2(default_cache_dir())


@pytest.fixture(scope="module")
def real_layers(smollm2_dir, tmp_path_factory):
    """{hf_name: (base weight [out, in], H [in, in])} for the linears of blocks 0 and 1."""
    text = tmp_path_factory.mktemp("cal") / "cal.txt"
    text.write_text(README.read_text() if README.is_file() else "The capital of France is Paris. " * 200)
    tok = load_tokenizer(smollm2_dir)
    calib = windows(token_stream([text], tok), 8, 64, 0)
    ckpt = open_checkpoint(smollm2_dir)
    arch = arch_of(ckpt)
    outer = {n: ckpt.get(n) for n in ("model.embed_tokens.weight", "model.norm.weight")}
    stream = embed_stream(arch, outer, calib, 8, make_mesh(1))  # one device: the single-device path
    out = {}
    for i in range(2):
        names = [n for n in ckpt.names() if n.startswith(arch.prefix(i))]
        tensors = {n: ckpt.get(n) for n in names}
        state = arch.block_state(i, tensors)
        hess, stream.hidden = capture(arch, i, state, stream, arch.require_input_groups())[:2]
        for ln in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            name = f"{arch.prefix(i)}{ln}.weight"
            out[name] = (np.asarray(tensors[name], np.float32), hess[ln])
    ckpt.close()
    return out


def _task_vectors(w: np.ndarray, tasks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = w.shape
    scale = 0.01 * np.sqrt(np.mean(w**2))
    d = []
    for _ in range(tasks):
        low = rng.standard_normal((rows, 4)) @ rng.standard_normal((4, cols)) / 2.0
        d.append(scale * (low + 0.5 * rng.standard_normal((rows, cols))))
    return np.stack(d).astype(np.float32)


@pytest.mark.slow
def test_sparsegpt_ties_beats_magnitude_ties_at_density_01(real_layers):
    for k, (name, (w, h)) in enumerate(real_layers.items()):
        deltas = jnp.asarray(_task_vectors(w, 2, k))
        errs = {}
        for trim in ("sparsegpt", "magnitude"):
            merged, trimmed, _ = merge_tensor(
                "ties",
                deltas,
                weights=[1.0, 1.0],
                densities=[0.1, 0.1],
                trim=trim,
                hessian=h,
                params={},
                seed=0,
                name=name,
            )
            kept = np.asarray(jnp.mean(trimmed != 0, axis=(1, 2)))
            np.testing.assert_allclose(kept, 0.1, atol=0.005)
            te, me = relative_errors(deltas, trimmed, merged, jnp.ones(2), h)
            errs[trim] = (np.asarray(te), float(me))
        sp, mag = errs["sparsegpt"], errs["magnitude"]
        assert np.all(sp[0] < mag[0]), (name, errs)  # each task vector's output error
        assert sp[1] < mag[1], (name, errs)  # the merged layer's output error
