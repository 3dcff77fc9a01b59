"""Smoothing pass: group linear ops by shared activation, find fold sites, compute scales.

A group is every supported linear op reading one activation X (Q/K/V after one norm,
gate/up after another): they get ONE scale vector, from the max over all their weights::

    s_j = max|X_j|^alpha / max_{W in group, n} |W[j, n]|^(1 - alpha)

This module only plans (:func:`find_groups`, :func:`plan_smoothing`); :mod:`passes.fold`
rewrites the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from calibrators.minmax import StatTarget
from calibrators.stats import ChannelStats
from passes.config import SmoothingConfig, Unfoldable
from passes.ir.errors import SmoothQuantError
from passes.ir.graph import GraphView
from passes.linear import LinearOp
from passes.patterns import SHAPE_READERS, AttentionValueFold, FoldSite, InsertedMul, find_fold_site
from passes.scales import smoothing_scales


@dataclass(frozen=True)
class SmoothingGroup:
    activation: str
    consumers: tuple[LinearOp, ...]
    channels: int
    channel_axis: int
    site: FoldSite | None
    skip_reason: str | None = None
    compensate: tuple = ()  # readers of X outside the group: they get Mul(X / s, s)
    split: bool = False  # unsmoothable: split its outlier channels off instead (passes.split)

    @property
    def consumer_names(self) -> list[str]:
        return [op.name for op in self.consumers]


@dataclass(frozen=True)
class PlannedGroup:
    group: SmoothingGroup
    scales: np.ndarray  # s, float64 [C]
    note: str | None = None  # how the scales were chosen, when it is worth reporting


def stat_targets(view: GraphView, linear_ops: list[LinearOp]) -> list[StatTarget]:
    """One calibration target per distinct activation read by a linear op."""
    targets = {}
    for op in linear_ops:
        if op.activation in targets:
            continue
        dims = view.store.proto(op.weight).dims
        targets[op.activation] = StatTarget(op.activation, op.activation_channel_axis, int(dims[op.weight_in_axis]),
                                            len(dims) if op.activation_channel_axis == 1 else None)
    return list(targets.values())


def find_groups(view: GraphView, linear_ops: list[LinearOp], unfoldable: Unfoldable,
                fold_scalars: bool = True, attention_values: bool = False) -> list[SmoothingGroup]:
    """Group ``linear_ops`` by the activation they read and find each group's fold site
    (``fold_scalars``, ``attention_values``: see :func:`passes.patterns.find_fold_site`). Groups without one are
    handled by ``unfoldable`` (AUTO: an explicit Mul where a kept scalar is the only obstacle,
    skipped elsewhere)."""
    by_activation: dict[str, list[LinearOp]] = defaultdict(list)
    for op in linear_ops:
        by_activation[op.activation].append(op)
    linear_by_output = {op.node.output[0]: op for op in linear_ops}
    groups = []
    for activation, ops in by_activation.items():
        axes = {op.activation_channel_axis for op in ops}
        widths = {int(view.store.proto(op.weight).dims[op.weight_in_axis]) for op in ops}
        ranks = {len(view.store.proto(op.weight).dims) for op in ops}
        if len(axes) > 1 or len(widths) > 1 or len(ranks) > 1:
            groups.append(SmoothingGroup(activation, tuple(ops), widths.pop(), axes.pop(), None,
                                         "its linear consumers disagree on the channel axis or width"))
            continue
        axis, channels, rank = axes.pop(), widths.pop(), ranks.pop()
        site = find_fold_site(view, activation, linear_by_output, channels, axis, rank if axis == 1 else None,
                              fold_scalars, attention_values)
        group_ids = {id(op.node) for op in ops}
        # Readers outside the group need X back, except those that read only its shape.
        others = tuple(c for c in view.consumers.get(activation, [])
                       if id(c) not in group_ids and c.op_type not in SHAPE_READERS)
        if isinstance(site, InsertedMul) and unfoldable in (Unfoldable.SKIP, Unfoldable.SPLIT):
            site = site.reason  # a scalar kept for the runtime's fusions: as unfoldable as any
        group = SmoothingGroup(activation, tuple(ops), channels, axis, None, compensate=others)
        groups.append(without_site(group, site, unfoldable, rank) if isinstance(site, str)
                      else replace(group, site=site, compensate=() if isinstance(site, InsertedMul) else others))
    return groups


def without_site(group: SmoothingGroup, reason: str, unfoldable: Unfoldable, rank: int | None = None) -> SmoothingGroup:
    """``group`` when no constant can absorb 1/s (``reason``): an explicit Mul, a split, or skipped."""
    if unfoldable is Unfoldable.MUL:
        return replace(group, site=InsertedMul(reason, group.activation, group.channel_axis,
                                               rank if group.channel_axis == 1 else None), compensate=())
    return replace(group, site=None, skip_reason=reason, compensate=(), split=unfoldable is Unfoldable.SPLIT)


def weight_channel_amax(view: GraphView, op: LinearOp) -> np.ndarray:
    """max |W| over output channels (and kernel positions), per input channel."""
    w = np.abs(view.store.array(op.weight).astype(np.float32))
    axes = tuple(a for a in range(w.ndim) if a != op.weight_in_axis)
    return w.max(axis=axes)


def group_scales(view: GraphView, group: SmoothingGroup, act_amax: np.ndarray, alpha: float) -> np.ndarray:
    """``s`` for one group: every consumer's weight counts (max over them per input channel)."""
    w_amax = np.max([weight_channel_amax(view, op) for op in group.consumers], axis=0)
    if isinstance(group.site, AttentionValueFold):  # one scale per value column: tie the channels reading it
        act_amax, w_amax = group.site.tie(np.asarray(act_amax, dtype=np.float64)), group.site.tie(w_amax)
    return smoothing_scales(act_amax, w_amax, alpha)


def smoothed_range(stats: ChannelStats, tensor: str, s: np.ndarray | float = 1.0,
                   exclude: np.ndarray | None = None):
    """Per-tensor range of ``X / s`` (s > 0) from per-channel statistics of X.

    ``max|X'| = max_j(amax_j / s_j)``; with signed statistics ``lo = min_j(min_j / s_j)`` and
    ``hi = max_j(max_j / s_j)``, else the symmetric ``[-max|X'|, max|X'|]``. ``exclude``:
    channel indices left out (split off to FP, :mod:`passes.split`).
    """
    from passes.qdq import ActivationRange  # noqa: PLC0415 - qdq does not depend on smoothing

    keep = slice(None)
    if exclude is not None and len(exclude):
        keep = np.ones(stats.amax[tensor].size, dtype=bool)
        keep[exclude] = False
    s = s[keep] if isinstance(s, np.ndarray) else s
    if tensor in stats.minimum:
        lows, highs = stats.minimum[tensor][keep], stats.maximum[tensor][keep]
        lo, hi = float(np.min(lows / s)), float(np.max(highs / s))
        short = -lows if abs(lo) <= abs(hi) else highs  # the short side's per-channel extremes, in X's units
        return ActivationRange(lo, hi, floored=_common_bound(short))
    amax = float(np.max(stats.amax[tensor][keep] / s))
    return ActivationRange(-amax, amax)


FLOOR_TOLERANCE = 0.02  # per-channel extremes within 2% of the median one: a bound of the function


def _common_bound(extremes: np.ndarray) -> bool:
    """Whether the channels' extremes on one side meet at one value (GELU's -0.17, SiLU's -0.28,
    ReLU's 0), as a function's bound does, rather than spreading as data's rare extremes do."""
    if extremes.size < 8:
        return False
    median = float(np.median(extremes))
    return median >= 0 and float(np.max(extremes)) <= (1 + FLOOR_TOLERANCE) * median


def plan_smoothing(view: GraphView, groups: list[SmoothingGroup], stats: ChannelStats,
                   config: SmoothingConfig) -> tuple[list[PlannedGroup], list[SmoothingGroup]]:
    """Scale vectors for each foldable group; groups that cannot be smoothed come back with a reason."""
    planned, skipped = [], []
    for group in groups:
        if group.site is None:
            skipped.append(group)
            continue
        act = stats.amax.get(group.activation)
        if act is None:
            raise SmoothQuantError(
                f"the statistics have no entry for activation {group.activation!r} (read by "
                f"{group.consumer_names[0]!r}); were they collected on another model?"
            )
        if act.shape != (group.channels,):
            raise SmoothQuantError(f"statistics for activation {group.activation!r} have {act.shape[0]} channels, "
                                   f"the model has {group.channels}")
        if not np.all(np.isfinite(act)):
            skipped.append(SmoothingGroup(group.activation, group.consumers, group.channels, group.channel_axis, None,
                                          "non-finite activation statistics"))
            continue
        planned.append(PlannedGroup(group, group_scales(view, group, act, config.alpha)))
    return planned, skipped
