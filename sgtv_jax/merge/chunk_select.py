"""Row-chunked reading and selection for `sgtv_jax.merge.streaming`: cut points of the m largest |d|.

`Source` reads the base and the models' rows as float32 task vectors and
their reversed keys (`0x7FFFFFFF - bits(|d|)`: the k largest |d| are the k
smallest keys). `CutFinder` (mixed into the streaming merge) finds each
(task, m) cut over all chunks: a sampled bracket and one counting pass, else
digit-by-digit histograms (`sgtv_jax.select.digit_plan`); a tensor in one
chunk uses `sgtv_jax.select.bracket_cut`, the host path of the one exact-k
selection. Ties follow the merge order (row-major, or column-major when
transposed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from sgtv_jax.select import SAMPLE, Cut, bracket_cut, cut_at, digit_plan, nth_true

RowReader = Callable[[int, int], np.ndarray]
"""`(r0, r1) -> rows [r0, r1)` of one checkpoint's tensor, shape `[r1 - r0, *shape[1:]]`."""

KEY_MAX = np.uint32(0x7FFFFFFF)  # |d| bit patterns are <= this (no NaN)
KEY_INF = int(KEY_MAX) - 0x7F800000  # keys <= this: |d| is Inf or NaN
DIGITS = digit_plan(32, 1 << 32)  # 16 + 16 bits, whatever the tensor's size


SAMPLE_ROWS = 256
"""Whole rows sampled (at least) to bracket a cut point of a tensor read in chunks."""


class Counted(NamedTuple):
    """Cuts found by the counting pass ((task, m) -> cut) and whether any task vector is nonzero."""

    cuts: dict[tuple[int, int], Cut]
    changed: bool


def bytes_per_entry(tasks: int) -> int:
    """Working bytes per tensor entry of one chunk, for `tasks` models.

    float32: base (4) + task vectors (4T) + trimmed vectors (4T) + the merge's
    temporaries (weighted vectors, agreement masks, products: ~12T) + merged
    and output (8).
    """
    return 12 + 20 * tasks


def row_bracket(sample: np.ndarray, q: float) -> tuple[int, int]:
    """Keys `[lo, hi]` that hold the `q`-quantile key of a tensor with high probability, from
    the keys of sampled whole rows `[rows, cols]`.

    The sample ranks `q s -/+ (6 sigma + 16)`, s the sample size, sigma the binomial spread
    times the design effect of sampling rows (rows differ in scale): the variance between the
    rows' fractions below the sample quantile over the binomial one (at least 1).
    """
    flat = np.sort(sample.reshape(-1))
    s = flat.size
    kq = flat[min(s - 1, int(q * s))]
    p_rows = np.count_nonzero(sample < kq, axis=1) / sample.shape[1]
    binom = q * (1.0 - q) / s
    deff = max(1.0, float(np.var(p_rows)) / sample.shape[0] / binom) if binom > 0 else 1.0
    delta = 6.0 * math.sqrt(s * q * (1.0 - q) * deff) + 16.0
    lo_i, hi_i = int(q * s - delta), int(q * s + delta) + 1
    lo = int(flat[lo_i]) if lo_i >= 0 else 0
    hi = int(flat[hi_i]) if hi_i < s else int(KEY_MAX)
    return lo, hi


class Source:
    """The base and model readers of one tensor: float32 rows and task vectors, checked."""

    def __init__(self, name: str, base: RowReader, models: Sequence[RowReader], shape: tuple[int, ...]) -> None:
        self.name, self.base, self.models, self.shape = name, base, list(models), shape

    def read(self, reader: RowReader, r0: int, r1: int, what: str) -> np.ndarray:
        a = np.asarray(reader(r0, r1))
        want = (r1 - r0,) + self.shape[1:]
        if a.shape != want:
            raise ValueError(f"tensor {self.name!r}: {what} rows [{r0}, {r1}) have shape {a.shape}, expected {want}")
        return a

    def rows(self, r0: int, r1: int) -> Rows:
        """Rows `[r0, r1)`: base float32, task vectors `model - base` float32 and their keys, checked
        for NaN / Inf."""
        b = self.read(self.base, r0, r1, "base").astype(np.float32, copy=False)
        d = np.empty((len(self.models),) + b.shape, np.float32)
        keys = np.empty(d.shape, np.uint32)
        bad, changed = [], False
        for t, reader in enumerate(self.models):
            np.subtract(self.read(reader, r0, r1, f"model {t}").astype(np.float32, copy=False), b, out=d[t])
            k = np.abs(d[t], out=keys[t].view(np.float32)).view(np.uint32)
            np.subtract(KEY_MAX, k, out=k)
            kmin = int(k.min()) if k.size else int(KEY_MAX)
            if kmin <= KEY_INF:  # |d| >= inf bits: Inf or NaN
                bad.append((t, int(np.count_nonzero(~np.isfinite(d[t])))))
            changed = changed or kmin != KEY_MAX  # some |d| > 0
        if bad:
            raise ValueError(
                f"NaN or Inf in task vector(s) for tensor {self.name!r} (rows [{r0}, {r1})): "
                + ", ".join(f"model {t} ({c} entries)" for t, c in bad)
            )
        return Rows(b, d, keys, changed)


class Rows(NamedTuple):
    """One chunk: base `[rows, ...]`, task vectors `d` `[T, rows, ...]` and their reversed keys
    (`0x7FFFFFFF - bits(|d|)`: the k largest |d| are the k smallest keys); `changed`: some
    task-vector entry is nonzero."""

    b: np.ndarray
    d: np.ndarray
    keys: np.ndarray
    changed: bool


class CutFinder:
    """The cut-point passes of a chunked merge; the merge class supplies the fields below."""

    src: Source
    spans: list[tuple[int, int]]
    tasks: int
    rows: int
    cols: int
    n: int
    whole: bool
    transpose: bool
    ranks: dict[int, list[int]]

    def _rows(self, r0: int, r1: int) -> Rows:
        raise NotImplementedError

    def _take(self, keys: np.ndarray, cut: Cut, seen: dict, tm: tuple[int, int]) -> np.ndarray:
        """This chunk's entries among the cut's m largest (`keys` `[rows, cols]`); updates `seen`."""
        out = keys < np.uint32(cut.key)
        if cut.ties == 0:
            return out
        eq = keys == np.uint32(cut.key)
        if not self.transpose:  # the first `ties` equal keys in row-major order
            flat = eq.reshape(-1)
            count = int(np.count_nonzero(flat))
            if seen[tm] + count <= cut.ties:
                out |= eq
            elif seen[tm] < cut.ties:
                end = nth_true(flat, cut.ties - seen[tm]) + 1
                out.reshape(-1)[:end] |= flat[:end]
            seen[tm] += count
            return out
        # transposed: every tie left of column `col`, and the first `col_ties` of column `col` by row
        out[:, : cut.col] |= eq[:, : cut.col]
        col = eq[:, cut.col]
        out[:, cut.col] |= col & (seen[tm] + np.cumsum(col) <= cut.col_ties)
        seen[tm] += int(np.count_nonzero(col))
        return out

    def _find_cuts(self, unchanged_stops: bool = False) -> tuple[dict[tuple[int, int], Cut], bool | None]:
        """Key and tie rule of every (task, m) the trims need: one pass per digit (+1 for transposed ties).

        Returns (cuts, whether any task vector is nonzero; None when no pass ran).
        `unchanged_stops`: when the first pass finds every task vector zero, stop there (the cuts
        are then incomplete: for a method whose result is the base, `maps_zero_to_zero`).
        """
        cuts: dict[tuple[int, int], Cut] = {}
        open_: dict[tuple[int, int], tuple[int, int]] = {}  # (t, m) -> (prefix, count below it)
        for t, ms in self.ranks.items():
            for m in ms:
                if m <= 0:
                    cuts[(t, m)] = Cut(0, 0)  # no key is below 0: keeps nothing
                else:
                    open_[(t, m)] = (0, 0)
        if not open_:
            return cuts, None
        changed = False
        if self.whole:  # in memory: a sampled bracket (one pass), the histograms only if it misses
            chunk = self._rows(*self.spans[0])
            changed = chunk.changed
            for t, m in list(open_):
                cut = bracket_cut(chunk.keys[t].reshape(-1), m, int(KEY_MAX))
                if cut is not None:
                    cuts[(t, m)] = cut
                    del open_[(t, m)]
        else:  # a sampled bracket per cut, one counting pass; the histograms only for those it misses
            counted = self._counted_cuts(list(open_))
            for tm, cut in counted.cuts.items():
                cuts[tm] = cut
                del open_[tm]
            changed = counted.changed
        if unchanged_stops and not changed:
            return cuts, False
        for i, (shift, width) in enumerate(DIGITS):
            if not open_:
                break
            bins = 1 << width
            groups = {(t, prefix) for (t, _), (prefix, _) in open_.items()}  # one histogram per (task, prefix)
            hists = {g: np.zeros(bins, np.int64) for g in groups}
            for r0, r1 in self.spans:
                chunk = self._rows(r0, r1)
                changed = changed or chunk.changed
                for t in {t for t, _ in groups}:
                    kr = chunk.keys[t].reshape(-1)
                    if i == 0:  # keys < 2^31: the top digit needs no mask
                        hists[(t, 0)] += np.bincount(kr >> np.uint32(shift), minlength=bins)
                        continue
                    high = kr >> np.uint32(shift + width)
                    for gt, prefix in groups:
                        if gt == t:
                            sel = kr[high == np.uint32(prefix)]
                            hists[(t, prefix)] += np.bincount(
                                (sel >> np.uint32(shift)) & np.uint32(bins - 1), minlength=bins
                            )
            for (t, m), (prefix, below) in list(open_.items()):
                hist = hists[(t, prefix)]
                cum = below + np.cumsum(hist)
                b = int(np.argmax(cum >= m))
                below_b = int(cum[b] - hist[b])
                if below_b + int(hist[b]) == m:  # the cut takes all of bin b: keys below the next bin
                    cuts[(t, m)] = Cut((((prefix << width) | b) + 1) << shift, 0)
                    del open_[(t, m)]
                elif shift == 0:  # the key is complete; some of the hist[b] equal keys are taken
                    cuts[(t, m)] = Cut((prefix << width) | b, m - below_b)
                    del open_[(t, m)]
                else:
                    open_[(t, m)] = ((prefix << width) | b, below_b)
            if not open_:
                break
        if self.transpose and any(c.ties and c.col < 0 for c in cuts.values()):
            cuts = self._column_ties(cuts)
        return cuts, changed

    def _sample(self) -> np.ndarray:
        """Reversed keys `[T, rows, cols]` of a fixed random set of whole rows (sorted; read one by one)."""
        n_rows = min(self.rows, max(SAMPLE_ROWS, SAMPLE // max(self.cols, 1)), max(16, 8 * SAMPLE // max(self.cols, 1)))
        picked = np.sort(np.random.default_rng(0).choice(self.rows, n_rows, replace=False))
        return np.concatenate(
            [self.src.rows(int(r), int(r) + 1).keys.reshape(self.tasks, 1, self.cols) for r in picked], axis=1
        )

    def _counted_cuts(self, wanted: list[tuple[int, int]]) -> Counted:
        """Cuts of `wanted` (task, m) from one pass: a bracket `[lo, hi]` per cut from a sample of
        whole rows (widened by the spread between rows), then per chunk the keys below `lo` counted
        and those inside gathered (with their merge-order positions when transposed, for the tie
        rule); the m-th key is then selected among the gathered. Cuts whose bracket misses, or
        whose gathered keys outgrow a quarter of a chunk's working set (4 MiB at least), are left out."""
        out = {tm: Cut(int(KEY_MAX) + 1, 0) for tm in wanted if tm[1] >= self.n}  # all: below one past the largest
        sample = self._sample()
        brackets = {(t, m): row_bracket(sample[t], m / self.n) for t, m in wanted if m < self.n}
        room = max(1 << 22, (self.spans[0][1] - self.spans[0][0]) * self.cols * bytes_per_entry(self.tasks) // 4)
        per_entry = 12 if self.transpose else 4
        below = dict.fromkeys(brackets, 0)
        gathered: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray | None]]] = {tm: [] for tm in brackets}
        used, changed = 0, False
        for r0, r1 in self.spans:
            chunk = self._rows(r0, r1)
            changed = changed or chunk.changed
            for tm, (lo, hi) in brackets.items():
                if tm not in gathered:
                    continue
                kr = chunk.keys[tm[0]].reshape(-1)
                below[tm] += int(np.count_nonzero(kr < np.uint32(lo)))
                idx = np.flatnonzero((kr - np.uint32(lo)) <= np.uint32(hi - lo))  # keys below lo wrap: outside
                used += idx.size * per_entry
                if used > room:  # too many inside: leave it to the histograms
                    used -= sum(k.size for k, _ in gathered.pop(tm)) * per_entry + idx.size * per_entry
                    continue
                pos = None
                if self.transpose:  # merge order: column-major
                    pos = (idx % self.cols) * self.rows + (r0 + idx // self.cols)
                gathered[tm].append((kr[idx], pos))
        for tm, parts in gathered.items():
            m, lo_below = tm[1], below[tm]
            cand = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.uint32)
            if lo_below >= m or lo_below + cand.size < m:
                continue  # the bracket missed
            key = int(np.partition(cand, m - lo_below - 1)[m - lo_below - 1])
            eq = cand == np.uint32(key)
            cut = cut_at(key, lo_below + int(np.count_nonzero(cand < np.uint32(key))), int(np.count_nonzero(eq)), m)
            if cut.ties and self.transpose:  # the first `ties` equal keys in the merge order
                order = np.sort(np.concatenate([p for _, p in parts])[eq])
                last = int(order[cut.ties - 1])
                col = last // self.rows
                cut = cut._replace(
                    col=col, col_ties=int(np.count_nonzero((order >= col * self.rows) & (order <= last)))
                )
            out[tm] = cut
        return Counted(out, changed)

    def _column_ties(self, cuts: dict[tuple[int, int], Cut]) -> dict[tuple[int, int], Cut]:
        """Transposed merge order is column-major: per column, count the keys equal to each cut (one pass)."""
        per_col = {tm: np.zeros(self.cols, np.int64) for tm, c in cuts.items() if c.ties}
        for r0, r1 in self.spans:
            keys = self._rows(r0, r1).keys
            for t, m in per_col:
                kr = keys[t].reshape(r1 - r0, self.cols)
                per_col[(t, m)] += np.count_nonzero(kr == np.uint32(cuts[(t, m)].key), axis=0)
        for tm, counts in per_col.items():
            cut = cuts[tm]
            cum = np.cumsum(counts)
            col = int(np.argmax(cum >= cut.ties))
            cuts[tm] = cut._replace(col=col, col_ties=cut.ties - int(cum[col] - counts[col]))
        return cuts
