"""Per-group migration strength: pick α for each smoothing group on the calibration data.

One global α is a compromise: a group whose activations carry a 100x outlier wants α near
1, a group with tame activations and spiky weights wants it low, and some groups are best
left unsmoothed. For every candidate ``c`` in ``{none} ∪ grid`` and every foldable group G
with scales ``s_G(c)`` (``s = 1`` for none), the quantized error of each of G's ops is
measured with FP inputs (:func:`passes.sensitivity.measure_layer_errors`, trial scales, no
folding)::

    E_G(c) = Σ_{op ∈ G} |f(DQ(Q(X / s)), DQ(quant(s W))) - f(X, W)|² / |f(X, W)|²

and G gets ``argmin_c E_G(c)``. Each candidate costs one pass over the calibration data.

With ``split_ratio`` the candidates also include :data:`SPLIT`: no smoothing, the group's
outlier channels (:func:`passes.split.outlier_channels`) computed in FP beside the quantized
op. It is measured on the split form itself, and a group without outlier channels (or with an
op that cannot be split) gets the unsmoothed error for it, so ties go to no smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from calibrators.data import CalibrationData
from calibrators.stats import ChannelStats
from passes.config import QuantizationConfig
from passes.graph import GraphView
from passes.onnx_io import LoadedModel
from passes.sensitivity import Trial, measure_group_candidates
from passes.smooth import PlannedGroup, SmoothingGroup, group_scales, smoothed_range
from passes.split import plan_split

DEFAULT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SPLIT = "split"  # the candidate "outlier channels in FP, no smoothing"


@dataclass(frozen=True)
class AlphaChoice:
    activation: str
    alpha: float | str | None  # None: no smoothing; SPLIT: outlier channels split off to FP
    errors: dict[float | str | None, float]  # candidate -> E_G

    def describe(self) -> str:
        chosen = "none" if self.alpha is None else self.alpha if self.alpha == SPLIT else f"{self.alpha:g}"
        base = self.errors.get(None, float("nan"))
        return f"α={chosen} (E {self.errors[self.alpha]:.3g} vs {base:.3g} unsmoothed)"


def search_alpha(model: LoadedModel, proto: onnx.ModelProto, view: GraphView, groups: Sequence[SmoothingGroup],
                 stats: ChannelStats, opset: int, config: QuantizationConfig, data: CalibrationData,
                 grid: Sequence[float] = DEFAULT_GRID, *, split_ratio: float | None = None,
                 progress: bool = True) -> tuple[list[PlannedGroup], list[SmoothingGroup], list[AlphaChoice]]:
    """Smoothing plan with the best candidate per group; groups best left alone (or split) come
    back skipped (with ``split=True``)."""
    foldable = [g for g in groups if g.site is not None and g.activation in stats.amax
                and np.all(np.isfinite(stats.amax[g.activation]))]
    candidates: list[float | str | None] = [None, *([SPLIT] if split_ratio else []), *grid]
    scales = {(g.activation, c): group_scales(view, g, stats.amax[g.activation], c)
              for g in foldable for c in grid}
    outliers = {g.activation: _split_channels(view, g, stats, split_ratio) for g in foldable} if split_ratio else {}

    def trial(group: SmoothingGroup, c: float | str | None) -> Trial:
        if c == SPLIT:
            idx = outliers[group.activation]
            return Trial(None, smoothed_range(stats, group.activation, 1.0, idx), idx)
        s = None if c is None else scales[(group.activation, c)]
        return Trial(s, smoothed_range(stats, group.activation, 1.0 if s is None else s))

    errors = measure_group_candidates(model, proto, foldable, candidates, trial, opset, config, data,
                                      desc="searching α per group", progress=progress)
    planned, skipped, choices = [], [], []
    foldable_ids = {g.activation for g in foldable}
    for g in groups:
        if g.activation not in foldable_ids:
            skipped.append(g)
            continue
        best = min(candidates, key=lambda c: (errors[g.activation][c], c is not None))
        choice = AlphaChoice(g.activation, best, errors[g.activation])
        choices.append(choice)
        if best is None or best == SPLIT:
            why = "quantized error is lowest without smoothing" if best is None else choice.describe()
            skipped.append(replace(g, site=None, compensate=(), skip_reason=f"α search: {why}", split=best == SPLIT))
        else:
            planned.append(PlannedGroup(g, scales[(g.activation, best)], f"searched: {choice.describe()}"))
    return planned, skipped, choices


def _split_channels(view: GraphView, group: SmoothingGroup, stats: ChannelStats, ratio: float) -> np.ndarray:
    """The group's outlier channels, or none (no outliers, or an op of the group cannot be split)."""
    found = plan_split(view, list(group.consumers), stats.amax[group.activation], ratio)
    return np.zeros(0, dtype=np.int64) if isinstance(found, str) else found
