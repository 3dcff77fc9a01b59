"""Per-group migration strength: pick α (or no smoothing, or the outlier split) for each group.

One global α is a compromise: a group whose activations carry a 100x outlier wants α near
1, a group with tame activations and spiky weights wants it low, some groups are best left
unsmoothed, and a group whose input has a few channels far above the rest (a massive
first-token activation) is best served by computing those channels in FP. For every
candidate ``c`` of a group G (``none``, :data:`SPLIT` where G has outlier channels and the
activations are quantized per tensor, and the α of the grid where a constant or an explicit
Mul can take ``1/s``) the quantized error of each of G's ops is measured with FP inputs
(:func:`passes.search.sensitivity.measure_twins`, trial scales, no folding)::

    E_G(c) = Σ_{op ∈ G} mean_t |f(DQ(Q(X / s)), DQ(quant(s W))) - f(X, W)|²_t / |f(X, W)|²_t

(every token weighs the same) and G gets ``argmin_c E_G(c)``; ties go to no smoothing. Every
candidate of every group is measured in one pass (a pass per chunk of groups beyond the twins'
memory budget), on the first ``max_tokens`` tokens of
the calibration data (the ranges themselves come from all of it).

The split candidate (:func:`passes.split.outlier_channels`) is measured on the split form
itself: no smoothing, the outlier channels O computed in FP beside the quantized op. Where a
constant can take ``1/s`` too, :class:`SplitSmoothed` candidates combine both: O in FP, the other
channels smoothed with α of the grid's upper half (:func:`combined_grid`; ``s`` from their own
statistics; O's rows are exact either way)::

    X W = X[:, ~O] W[~O] + X[:, O] W[O] = (X[:, ~O] / s) (s W[~O]) + X[:, O] W[O]

The split takes the few channels smoothing cannot tame without starving the weights (a 90x
channel after GELU needs α near 1, and then the weights' rows carry the outlier), and the
smoothing balances what is left. INT8 only: FP8's step grows with the value, so the ordinary
channels keep their precision beside a large one and the plain split (for the extreme,
one-token outliers) is what pays; offered to FP8 too, split+α won the per-layer measurement but
not the model (SmolLM2 FP8 +1.59% vs +1.17% perplexity), and it costs twins. ``Target.TENSORRT``
only: ONNX Runtime's CPU kernels run each split's Gather, FP MatMul and Add as separate ops, and
its asymmetric uint8 activations already cover skewed ranges (MiniLM ``--target onnxruntime``:
cos 0.99920 at 1.55x fp32 with split+α, 0.99911 at 2.12x without).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from calibrators.data import CalibrationData
from calibrators.stats import ChannelStats
from passes.config import DEFAULT_ALPHA_GRID, Precision, QuantizationConfig, Target
from passes.ir.graph import GraphView
from passes.ir.onnx_io import LoadedModel
from passes.search.sensitivity import Trial, measure_group_candidates
from passes.smooth import PlannedGroup, SmoothingGroup, group_scales, smoothed_range
from passes.split import plan_split

SPLIT = "split"  # the candidate "outlier channels in FP, no smoothing"


@dataclass(frozen=True)
class SplitSmoothed:
    """The candidate "outlier channels in FP, the others smoothed with ``alpha``"."""

    alpha: float

    def __str__(self) -> str:
        return f"split+α={self.alpha:g}"


Candidate = float | str | SplitSmoothed | None  # α, SPLIT, SplitSmoothed(α), or None (no smoothing)


@dataclass(frozen=True)
class AlphaChoice:
    activation: str
    alpha: Candidate  # None: no smoothing; SPLIT: outlier channels split off to FP; SplitSmoothed: both
    errors: dict[Candidate, float]  # candidate -> E_G

    @property
    def label(self) -> str:
        if self.alpha is None:
            return "none"
        return str(self.alpha) if isinstance(self.alpha, (str, SplitSmoothed)) else f"α={self.alpha:g}"

    @property
    def split(self) -> bool:
        """Whether the group's outlier channels are computed in FP."""
        return self.alpha == SPLIT or isinstance(self.alpha, SplitSmoothed)

    def describe(self) -> str:
        base = self.errors.get(None, float("nan"))
        return f"{self.label} (E {self.errors[self.alpha]:.3g} vs {base:.3g} unsmoothed)"


def summarize_choices(choices: Sequence[AlphaChoice]) -> str:
    """One line: how many groups got each candidate, most frequent first."""
    counts = Counter(c.label for c in choices)
    return f"per-group search over {len(choices)} groups: " + ", ".join(
        f"{label} x{n}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def search_alpha(model: LoadedModel, proto: onnx.ModelProto, view: GraphView, groups: Sequence[SmoothingGroup],
                 stats: ChannelStats, opset: int, config: QuantizationConfig, data: CalibrationData,
                 grid: Sequence[float] = DEFAULT_ALPHA_GRID, *, split_ratio: float | None = None,
                 max_tokens: int | None = None, sample_columns: bool = True, progress: bool = True
                 ) -> tuple[list[PlannedGroup], list[SmoothingGroup], list[AlphaChoice]]:
    """Smoothing plan with the best candidate per group; groups best left alone (or split) come
    back skipped (with ``split=True``), groups smoothed and split come back planned with
    ``group.split=True``. ``split_ratio``: offer the split (None: never); groups
    without a fold site are measured too when they may be split. ``max_tokens``, ``sample_columns``:
    see :func:`passes.search.sensitivity.measure_twins`."""
    def finite(g: SmoothingGroup) -> bool:
        return g.activation in stats.amax and bool(np.all(np.isfinite(stats.amax[g.activation])))

    outliers = {g.activation: _split_channels(view, g, stats, split_ratio)
                for g in groups if split_ratio and finite(g) and (g.site is not None or g.split)}
    candidates: dict[str, list] = {}
    for g in groups:
        if not finite(g):
            continue
        has_outliers = len(outliers.get(g.activation, ())) > 0
        combine = (has_outliers and g.site is not None and config.precision is Precision.INT8
                   and config.target is Target.TENSORRT)
        offer = ([None] + ([SPLIT] if has_outliers else []) + (list(grid) if g.site is not None else [])
                 + ([SplitSmoothed(a) for a in combined_grid(grid)] if combine else []))
        if len(offer) > 1:
            candidates[g.activation] = offer
    searched = [g for g in groups if g.activation in candidates]
    scales = {(g.activation, c): group_scales(view, g, stats.amax[g.activation], c)
              for g in searched if g.site is not None for c in grid}
    for g in searched:  # split+α: s from the channels that stay quantized (O's rows are exact whatever s is)
        for c in candidates[g.activation]:
            if isinstance(c, SplitSmoothed):
                amax = stats.amax[g.activation].copy()
                amax[outliers[g.activation]] = 0.0
                scales[(g.activation, c)] = group_scales(view, g, amax, c.alpha)

    def trial(group: SmoothingGroup, c: Candidate) -> Trial:
        if c == SPLIT or isinstance(c, SplitSmoothed):
            idx = outliers[group.activation]
            s = scales[(group.activation, c)] if isinstance(c, SplitSmoothed) else None
            return Trial(s, smoothed_range(stats, group.activation, 1.0 if s is None else s, idx), idx)
        s = None if c is None else scales[(group.activation, c)]
        return Trial(s, smoothed_range(stats, group.activation, 1.0 if s is None else s))

    errors = measure_group_candidates(model, proto, searched, candidates, trial, opset, config, data,
                                      desc="searching α per group", max_tokens=max_tokens,
                                      sample_columns=sample_columns, progress=progress)
    planned, skipped, choices = [], [], []
    for g in groups:
        if g.activation not in candidates:
            skipped.append(g if finite(g) else replace(g, site=None, compensate=(), split=False,
                                                       skip_reason="non-finite activation statistics"))
            continue
        best = min(candidates[g.activation], key=lambda c: (errors[g.activation][c], c is not None))
        choice = AlphaChoice(g.activation, best, errors[g.activation])
        choices.append(choice)
        if best is None or best == SPLIT:
            why = "quantized error is lowest without smoothing" if best is None else choice.describe()
            reason = f"α search: {why}" if g.site is not None else f"{g.skip_reason}; {why}"
            skipped.append(replace(g, site=None, compensate=(), skip_reason=reason, split=best == SPLIT))
        else:
            planned.append(PlannedGroup(replace(g, split=choice.split), scales[(g.activation, best)],
                                        f"searched: {choice.describe()}"))
    return planned, skipped, choices


def combined_grid(grid: Sequence[float]) -> list[float]:
    """The α offered with the split: the upper half of ``grid``. With the outliers in FP, what α
    balances is the spread of ordinary channels, and α >= 0.8 won every such group measured
    (SmolLM2 INT8: 54 of 54, a BERT-base-sized encoder: 27 of 27); each candidate costs a twin
    per op, and the search's peak memory is its twins (SmolLM2: 3.2 -> 4.7 GB with the whole grid)."""
    ordered = sorted(set(grid))
    return ordered[len(ordered) // 2:]


def _split_channels(view: GraphView, group: SmoothingGroup, stats: ChannelStats, ratio: float) -> np.ndarray:
    """The group's outlier channels, or none (no outliers, or an op of the group cannot be split)."""
    found = plan_split(view, list(group.consumers), stats.amax[group.activation], ratio)
    return np.zeros(0, dtype=np.int64) if isinstance(found, str) else found
