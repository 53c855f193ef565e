"""The block-by-block merge on the newer families: Hessians equal PyTorch hook inputs, outputs load.

Gemma alternates sliding-window and global layers (different static graphs per
block), phi3 fuses q/k/v and gate/up into one linear each, qwen3 normalises
q/k per head; each must give every linear layer the inputs the PyTorch model
gives it. MoE blocks merge with calibrated trims (routing-weighted expert
Hessians, tested in test_pipeline_moe.py); a family without input groups is
refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
import yaml

from sgtv_jax.cli import main
from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.report import REPORT_FILE
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

LINEARS = {
    "qwen3": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}
LINEARS["gemma2"] = LINEARS["gemma3_text"] = LINEARS["qwen3"]


def _torch(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("arch", sorted(LINEARS))
def test_base_hessians_equal_torch_hook_inputs_and_output_loads(arch, tmp_path):
    paths = H.make_family(tmp_path, arch)
    cfg = parse_config(H.config_dict(paths, tmp_path, hessian_source="base"))
    sink: dict = {}
    run_merge(cfg, tmp_path / "merged", progress=False, hessian_sink=sink)
    calib = load_calibration(cfg.calibration, load_tokenizer(cfg.base_model), None)
    base = _torch(paths["base"])
    for block in range(3):  # gemma: blocks 0 and 2 are sliding-window layers, block 1 global
        want = H.torch_hessians(base, calib.input_ids, calib.mask, f"model.layers.{block}.", LINEARS[arch])
        for n in LINEARS[arch]:
            got, ref = sink[f"model.layers.{block}.{n}.weight"], want[n]
            np.testing.assert_allclose(
                got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=f"{arch} block {block} {n}"
            )
    merged = _torch(tmp_path / "merged")
    ids = torch.from_numpy(calib.input_ids[:2]).long()
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    name = f"model.layers.1.{LINEARS[arch][0]}.weight"
    assert not torch.equal(base_sd[name], merged_sd[name])


def test_moe_merges_with_sparsegpt_and_data_free_from_the_cli(tmp_path):
    """Routed experts get routing-weighted Hessians (checked against PyTorch in test_pipeline_moe.py)."""
    paths = H.make_family(tmp_path, "qwen3_moe")
    cfgfile = tmp_path / "merge.yaml"
    cfgfile.write_text(yaml.safe_dump(H.config_dict(paths, tmp_path)))
    assert main(["merge", str(cfgfile), str(tmp_path / "out"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    experts = [r for r in rep["layers"] if ".mlp.experts." in r["name"]]
    assert len(experts) == 3 * 4 * 3 and all(r["trim"] == "sparsegpt" for r in experts)
    # Top-2 of 4: each real token is routed to two experts of every block.
    downs = [r["hessian_tokens"][0] for r in experts if r["name"].endswith("down_proj.weight")]
    assert sum(downs) == 2 * 3 * rep["calibration_tokens"]
    merged = _torch(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=torch.tensor([[2, 3, 4, 5]])).logits).all()

    free = H.config_dict(paths, tmp_path, trim="magnitude")
    del free["calibration"]
    cfgfile.write_text(yaml.safe_dump(free))
    assert main(["merge", str(cfgfile), str(tmp_path / "out2"), "--quiet"]) == 0
    with torch.no_grad():
        assert torch.isfinite(_torch(tmp_path / "out2")(input_ids=torch.tensor([[2, 3, 4, 5]])).logits).all()


def test_a_family_without_input_groups_refuses_calibrated_trims_by_name(tmp_path, capsys, monkeypatch):
    """A family that declares no input groups gets a clear refusal before any work, data-free still merges."""
    import sgtv_jax.models.llama as llama

    paths = H.make_family(tmp_path, "qwen3")
    monkeypatch.setattr(llama, "input_groups", lambda cfg: None)
    cfgfile = tmp_path / "merge.yaml"
    cfgfile.write_text(yaml.safe_dump(H.config_dict(paths, tmp_path)))
    assert main(["merge", str(cfgfile), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "qwen3" in err and "declares no input groups" in err and "data-free trim" in err
    assert not (tmp_path / "out").exists()

    free = H.config_dict(paths, tmp_path, trim="magnitude")
    del free["calibration"]
    cfgfile.write_text(yaml.safe_dump(free))
    assert main(["merge", str(cfgfile), str(tmp_path / "out"), "--quiet"]) == 0
