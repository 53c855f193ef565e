"""A data-free merge whose output tensors are not the base's one for one: `slices`, or a re-indexed vocabulary.

`MappedRun` is the `DataFreeRun` of such a config: its plan comes from
`slices.plan_slices` (layers stacked from several models) or from
`byname.plan_by_name` with the models' vocabulary-indexed tensors re-indexed
to the output vocabulary (`tokenizer.build_vocab`); each merged tensor is read
from the checkpoints and names its entry says (`TensorEntry.readers`),
re-indexed when `vocab_rows`, and merged by `datafree.merge_entry` with the
parameters of its slice (`config.slice_config`). Copied tensors are the
stored bytes.

`mapped_run` says whether a config needs it; `headers_plan` is the same plan
from tensor headers only (what `sgtv check` and the memory estimate read);
`write_output_files` writes the tokenizer and chat template of any merge.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convert.chunked import ChunkedTensor
from sgtv_jax.pipeline.byname import BASE, MERGE, NamePlan, TensorEntry, plan_by_name
from sgtv_jax.pipeline.checkpoints import Checkpoints
from sgtv_jax.pipeline.config import ConfigError, MergeConfig, slice_config, slice_roles
from sgtv_jax.pipeline.datafree import DataFreeRun, TensorInputs, merge_entry
from sgtv_jax.pipeline.report import LayerRecord, jsonable
from sgtv_jax.pipeline.slices import plan_slices
from sgtv_jax.pipeline.tokenizer import FillLog, VocabMap, build_vocab, permute_rows, write_tokenizer_files


def _paths_labels(cfg: MergeConfig) -> tuple[list[str], list[str]]:
    paths = [cfg.base_model] + [m.model for m in cfg.models]
    labels = [f"base_model ({cfg.base_model_written or cfg.base_model})"] + [
        f"models[{t}] ({m.label})" if not cfg.slices else m.label for t, m in enumerate(cfg.models)
    ]
    return paths, labels


def plan_mapped(cfg: MergeConfig, ckpts: list[Any]) -> tuple[NamePlan, VocabMap | None] | None:
    """(the plan, the vocabulary map) of `cfg` over open checkpoints (0 the base); None: no mapping needed."""
    paths, labels = _paths_labels(cfg)
    vm = build_vocab(cfg, paths, [dict(c.config) for c in ckpts], labels)
    if not cfg.slices and vm is None:
        return None
    vocab_out = vm.size if vm is not None else None
    if cfg.slices:
        return plan_slices(cfg, ckpts, labels, vocab_out), vm
    return plan_by_name(ckpts[0], ckpts[1:], base_label=labels[0], labels=labels[1:], vocab_out=vocab_out), vm


def _inputs(arrays: list[np.ndarray]) -> TensorInputs:
    """Readers of tensors already read (participant m: `arrays[m]`)."""

    def rows(m: int, r0: int, r1: int) -> np.ndarray:
        return arrays[m][r0:r1]

    return TensorInputs(read=arrays.__getitem__, read_rows=rows)


class MappedRun(DataFreeRun):
    """The data-free run of a config with slices or a re-indexed vocabulary (module doc)."""

    def __init__(
        self, cfg: MergeConfig, planned: tuple[NamePlan, VocabMap | None], ckpts: Checkpoints, *, progress: bool = True
    ) -> None:
        super().__init__(cfg, progress=progress, ckpts=ckpts, plan=planned[0])
        self.vocab = planned[1]
        self.fills = FillLog()
        self._configs = {k: slice_config(cfg, k) for k in range(len(cfg.slices)) if slice_roles(cfg, k)[1]}

    def _all(self) -> list[Any]:
        return [self.ckpts.base] + self.ckpts.models

    def _readers(self, entry: TensorEntry) -> tuple[int, ...]:
        if entry.readers:
            return entry.readers
        if entry.action == MERGE:
            return tuple(range(self.T + 1))
        return (0,) if entry.action == BASE else (entry.source + 1,)

    def _fill_base(self, entry: TensorEntry) -> int | None:
        """The checkpoint whose row a token some participant lacks takes (None: the mean of those having it)."""
        if entry.group < 0:
            return 0
        sl = self.cfg.slices[entry.group]
        b, merged = slice_roles(self.cfg, entry.group)
        is_base = sl.sources[b].model == (sl.base_model or self.cfg.base_model) and b not in merged
        return self._readers(entry)[0] if is_base else None

    def _read(self, entry: TensorEntry) -> list[np.ndarray]:
        """The entry's source tensors, one per reader, re-indexed to the output vocabulary when `vocab_rows`."""
        ckpts = self._all()
        readers = self._readers(entry)
        names = entry.sources or (entry.name,)
        with self.timer("load"):
            arrays = [self.ckpts.get(ckpts[m], n) for m, n in zip(readers, names)]
        if not entry.vocab_rows or self.vocab is None:
            return arrays
        rows = dict(zip(readers, arrays))
        mapped = permute_rows(self.vocab, rows, self._fill_base(entry), self.fills)
        return [mapped[m] for m in readers]

    def tensor_chunks(self) -> Iterator[tuple[str, np.ndarray | ChunkedTensor]]:
        """Whole arrays: a mapped tensor is read whole (its rows may be re-indexed or come from other layers)."""
        return iter(self.tensors())

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for entry in tqdm(self.plan.entries, desc="merge", unit="tensor", disable=not self.progress):
            t0 = time.perf_counter()
            arrays = self._read(entry)
            if entry.action == MERGE:
                cfg = self._configs.get(entry.group, self.cfg)
                inputs = _inputs(arrays)
                out, rec = merge_entry(cfg, entry, inputs, self.out_dtype, self.timer, log=self.log)
                assert isinstance(out, np.ndarray)  # chunked=False: merged rows come back joined
                self.records.append(rec)
                yield entry.name, out
                continue
            m = self._readers(entry)[0]
            how = "base" if m == 0 else f"copy {self.ckpts.label(self._all()[m])}"
            self.records.append(
                LayerRecord(
                    entry.name,
                    entry.block,
                    False,
                    tuple(arrays[0].shape),
                    how if not entry.sources or entry.sources[0] == entry.name else f"{how}: {entry.sources[0]}",
                    [],
                    [],
                    None,
                    None,
                    None,
                    time.perf_counter() - t0,
                )
            )
            yield entry.name, arrays[0]

    def report(self, wall_s: float) -> dict[str, Any]:
        rep = super().report(wall_s)
        if self.vocab is not None:
            labels = _paths_labels(self.cfg)[1]
            rep["tokenizer"] = {
                **self.vocab.report(),
                "source": self.cfg.tokenizer.written if self.cfg.tokenizer else None,
                "no_source": list(self.fills.no_source),
                "filled_rows": {labels[m]: n for m, n in sorted(self.fills.filled.items())},
            }
        if self.cfg.slices:
            rep["slices"] = jsonable([s.to_dict() for s in self.cfg.slices])
        return rep

    def orbax_refusal(self) -> str | None:
        return (
            "--format orbax holds the base architecture's parameters, and slices / a re-indexed vocabulary "
            "change them; use --format hf"
        )


def _open(cfg: MergeConfig) -> Checkpoints:
    return Checkpoints(cfg)


def mapped_run(cfg: MergeConfig, *, by_name: bool, progress: bool = True) -> MappedRun | None:
    """The `MappedRun` of `cfg`, or None when it needs none (no slices; vocabularies already one).

    ConfigError when it needs one but the merge needs calibration data (the
    block-by-block merge runs the base model's own tensors).
    """
    if not cfg.slices and cfg.tokenizer is None:
        return None
    ckpts = _open(cfg)
    try:
        planned = plan_mapped(cfg, [ckpts.base] + ckpts.models)
        if planned is not None and not by_name:
            raise ConfigError(
                "a tokenizer that changes the vocabulary (union, another model's, added tokens) with calibration "
                "data is refused: the block-by-block merge runs the models as stored; use a data-free trim "
                "and method"
            )
    except BaseException:
        ckpts.close()
        raise
    if planned is None:
        ckpts.close()
        return None
    return MappedRun(cfg, planned, ckpts, progress=progress)


def headers_plan(cfg: MergeConfig) -> tuple[NamePlan, VocabMap | None] | None:
    """`plan_mapped` from headers only (for check and the memory estimate)."""
    if not cfg.slices and cfg.tokenizer is None:
        return None
    ckpts = _open(cfg)
    try:
        return plan_mapped(cfg, [ckpts.base] + ckpts.models)
    finally:
        ckpts.close()


def write_output_files(run: Any, out: Path, template: str | None) -> None:
    """The tokenizer (a `MappedRun`'s re-indexed vocabulary) and chat template (`output_chat_template`) into `out`."""
    vm = run.vocab if isinstance(run, MappedRun) else None
    write_tokenizer_files(vm, out, template)


def saves_tokenizer(run: Any) -> bool:
    """Whether `run` writes a tokenizer of its own (a changed vocabulary) rather than the base's copy."""
    return isinstance(run, MappedRun) and run.vocab is not None and run.vocab.tokenizer is not None


__all__ = [
    "MappedRun",
    "headers_plan",
    "mapped_run",
    "saves_tokenizer",
    "write_output_files",
]
