"""Folding pass: apply planned smoothing scales to the graph's constants.

For a group with scale s reading activation X::

    X' = X / s            absorbed by the group's fold site (norm gamma/beta, a producing
                          linear layer's output channels, or one inserted Mul)
    W'[j, :] = s_j W[j, :]  for every weight of the group (input-channel axis)

so ``X' W' = X W``: in exact arithmetic the model computes the same function. Weights
shared with nodes outside the group are cloned first, so those nodes are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from passes.ir.graph import GraphView
from passes.ir.naming import NameFactory
from passes.patterns import FoldContext, FoldKind, insert_channel_mul
from passes.smooth import PlannedGroup, SmoothingGroup


@dataclass(frozen=True)
class GroupResult:
    activation: str
    consumers: tuple[str, ...]
    kind: FoldKind | None  # None: skipped
    detail: str  # the fold site, or why it was skipped
    notes: tuple[str, ...] = ()
    scale_range: tuple[float, float] | None = None
    split_channels: int = 0  # input channels computed in FP (passes.split): kind SPLIT, or smoothed and split


@dataclass
class SmoothingReport:
    groups: list[GroupResult] = field(default_factory=list)

    def count(self, kind: FoldKind | None) -> int:
        return sum(1 for g in self.groups if g.kind is kind)

    @property
    def smoothed(self) -> list[GroupResult]:
        return [g for g in self.groups if g.kind not in (None, FoldKind.SPLIT)]

    def summary(self) -> str:
        split = self.count(FoldKind.SPLIT)
        both = sum(1 for g in self.smoothed if g.split_channels)
        lines = [
            f"smoothing groups: {len(self.groups)} found; {self.count(FoldKind.NORM)} folded into norm, "
            f"{self.count(FoldKind.LINEAR)} folded into linear, {self.count(FoldKind.MUL)} unfolded (explicit Mul), "
            + (f"{split} outlier channels split to FP, " if split else "") + f"{self.count(None)} skipped"
            + (f"; {both} smoothed groups also have their outlier channels split to FP" if both else "")
        ]
        for g in self.groups:
            head = ", ".join(g.consumers[:3]) + (f" (+{len(g.consumers) - 3})" if len(g.consumers) > 3 else "")
            if g.kind is None:
                lines.append(f"  skipped  {g.activation} -> [{head}]: {g.detail}")
            elif g.kind is FoldKind.SPLIT:
                lines.append(f"  split    {g.activation} -> [{head}]: {g.detail}")
            else:
                lo, hi = g.scale_range
                lines.append(f"  {g.kind.value:<7}  {g.activation} -> [{head}] via {g.detail}, s in [{lo:.3g}, {hi:.3g}]")
            lines.extend(f"           note: {n}" for n in g.notes)
        return "\n".join(lines)


def fold_smoothing(view: GraphView, planned: list[PlannedGroup], skipped: list[SmoothingGroup]) -> SmoothingReport:
    """Rewrite ``view.graph`` in place; return what was done for every group."""
    names = NameFactory(view.all_names())
    report = SmoothingReport()
    for item in planned:
        group, s = item.group, item.scales
        nodes = [op.node for op in group.consumers]
        ctx = FoldContext(view, names, nodes, [item.note] if item.note else [])
        group.site.apply(ctx, 1.0 / s)
        if group.compensate:
            _compensate(view, names, group, s)
            ctx.notes.append(f"compensating Mul(X', s) for {len(group.compensate)} other reader(s): "
                             + ", ".join(view.node_label(n) for n in group.compensate[:3]))
        scaled = set()
        for op in group.consumers:
            # Resolve the weight now: an earlier group may have cloned it.
            source = view.constant_source(op.node.input[1])
            key = (source, op.weight_in_axis)
            if key in scaled:
                continue
            group_users = [n for n in nodes if view.constant_source(n.input[1]) == source]
            ctx.scale_constant(op.node, 1, s, group_users, op.weight_in_axis, op.activation_channel_axis, None)
            scaled.add((view.constant_source(op.node.input[1]), op.weight_in_axis))
        report.groups.append(GroupResult(group.activation, tuple(group.consumer_names), group.site.kind,
                                         group.site.description, tuple(ctx.notes),
                                         (float(np.min(s)), float(np.max(s)))))
    for group in skipped:
        report.groups.append(GroupResult(group.activation, tuple(group.consumer_names), None, group.skip_reason))
    view.drop_unused_initializers()
    return report


def _compensate(view: GraphView, names: NameFactory, group: SmoothingGroup, s: np.ndarray) -> None:
    """Readers of X outside the group read ``Mul(X', s)``, which equals the old X."""
    x = group.activation
    rank = len(view.store.proto(group.consumers[0].weight).dims) if group.channel_axis == 1 else None
    insert_channel_mul(view, x, s, group.channel_axis, rank, list(group.compensate),
                       names.restore_scale(x), names.restored_tensor(x), names.restore_mul(x))
