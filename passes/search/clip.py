"""Clipping search: per-tensor activation ranges chosen by quantized output error, not by the max.

With max calibration one token can set a tensor's scale for every other token: SmolLM2's
layer-11 down-projection input reaches 3065 on the first token and about 6 elsewhere, so
a per-tensor INT8 step of 24 rounds nearly every other value to 0. Clipping trades the
saturation of rare values for resolution of the common ones.

For every activation group G (after its smoothing, ``s = 1`` if unsmoothed) with calibrated
range ``[lo, hi]`` of ``X / s``, and every ratio r of the grid, the range ``[r lo, r hi]`` is
tried (values outside saturate); each op's quantized output error is measured with FP inputs
as in :mod:`passes.search.alpha`, and G keeps ``argmin_r E_G(r)``. r = 1 is max calibration,
so the search never does worse on the calibration data. Every ratio is measured in the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from calibrators.data import CalibrationData
from calibrators.stats import ChannelStats
from passes.config import QuantizationConfig
from passes.ir.onnx_io import LoadedModel
from passes.search.sensitivity import Trial, measure_group_candidates
from passes.smooth import PlannedGroup, SmoothingGroup, smoothed_range

DEFAULT_CLIP_GRID = (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.025)


@dataclass(frozen=True)
class ClipChoice:
    activation: str
    ratio: float
    errors: dict[float, float]  # ratio -> E_G

    def describe(self) -> str:
        return f"clip {self.ratio:g} of max (E {self.errors[self.ratio]:.3g} vs {self.errors.get(1.0, float('nan')):.3g})"


def search_clipping(model: LoadedModel, proto: onnx.ModelProto, groups: Sequence[SmoothingGroup],
                    planned: Sequence[PlannedGroup], stats: ChannelStats, opset: int, config: QuantizationConfig,
                    data: CalibrationData, grid: Sequence[float] = DEFAULT_CLIP_GRID, *,
                    max_tokens: int | None = None, progress: bool = True) -> list[ClipChoice]:
    """The best clipping ratio per group, measured on ``proto`` before folding (trial scales)."""
    scales = {p.group.activation: p.scales for p in planned}
    targets = [g for g in groups if g.activation in stats.amax and np.all(np.isfinite(stats.amax[g.activation]))]
    ratios = sorted({1.0, *grid}, reverse=True)

    def trial(group: SmoothingGroup, r: float) -> Trial:
        s = scales.get(group.activation)
        return Trial(s, smoothed_range(stats, group.activation, 1.0 if s is None else s).scaled(r))

    errors = measure_group_candidates(model, proto, targets, {g.activation: ratios for g in targets}, trial, opset,
                                      config, data, desc="searching clipping per group", max_tokens=max_tokens,
                                      progress=progress)
    return [ClipChoice(g.activation, min(ratios, key=lambda r: (errors[g.activation][r], -r)), errors[g.activation])
            for g in targets]
