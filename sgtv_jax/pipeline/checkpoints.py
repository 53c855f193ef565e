"""The checkpoints of one merge (base + fine-tunes), read lazily tensor by tensor.

Every float tensor read is checked for NaN / Inf; the error names the tensor
and the model as the YAML wrote it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.dtypes import count_nonfinite
from convert.lora import open_model
from convert.readers import open_checkpoint
from sgtv_jax.errors import NumericsError
from sgtv_jax.pipeline.config import MergeConfig


class Checkpoints:
    """`base` and `models[t]` of a `MergeConfig`, open for reading (close with `close`)."""

    def __init__(self, cfg: MergeConfig) -> None:
        self.cfg = cfg
        self.base = open_checkpoint(cfg.base_model)
        self.models = [open_model(m.model, m.adapter) for m in cfg.models]  # `base+adapter`: LoRA applied

    def label(self, ckpt: Any) -> str:
        """The checkpoint as the YAML names it, e.g. `models[1] (ft/math)`."""
        if ckpt is self.base:
            return f"base_model ({self.cfg.base_model_written or self.cfg.base_model})"
        t = next(i for i, m in enumerate(self.models) if m is ckpt)
        return f"models[{t}] ({self.cfg.models[t].label})"

    def get(self, ckpt: Any, name: str) -> np.ndarray:
        """Tensor `name` of `ckpt`; `NumericsError` naming tensor and model if it holds NaN/Inf."""
        return self._finite(ckpt, name, ckpt.get(name))

    def get_rows(self, ckpt: Any, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows `[r0, r1)` (first axis) of tensor `name` of `ckpt`, NaN/Inf-checked like `get`.

        Reads only those rows where the reader can (`get_rows` of safetensors);
        other readers read the tensor and slice it.
        """
        rows = getattr(ckpt, "get_rows", None)
        a = rows(name, r0, r1) if rows is not None else ckpt.get(name)[r0:r1]
        return self._finite(ckpt, name, a)

    def _finite(self, ckpt: Any, name: str, a: np.ndarray) -> np.ndarray:
        bad = count_nonfinite(a)  # float16/32/64 and ml_dtypes' bfloat16; 0 for integers
        if bad:
            raise NumericsError(
                f"tensor {name!r} of {self.label(ckpt)} has {bad} NaN or Inf entries "
                "(a broken checkpoint: fix or replace this model)"
            )
        return a

    def read_base(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: self.get(self.base, n) for n in names}

    def read_models(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """`names` of every fine-tuned model, one dict per model."""
        return [{n: self.get(m, n) for n in names} for m in self.models]

    def close(self) -> None:
        for c in [self.base] + self.models:
            c.close()
