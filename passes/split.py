"""Outlier-channel split pass: a few input channels of a linear op computed in FP, the rest quantized.

For a linear op ``Y = X W`` (``W``: ``[K, N]``) whose input has a handful of channels ``O``
far larger than the others (LLM.int8()'s mixed-precision decomposition, Dettmers et al. 2022)::

    Y = X W = X W_m + X[..., O] W[O, :]          W_m = W with the rows O set to zero

exactly, in FP. The first term is then quantized like any linear op, except that:

- its activation range is calibrated over the channels not in ``O``: the outliers no longer
  set the step of every other channel (in ``Q(X)`` they saturate, but meet zero weights);
- GPTQ sees those inputs as dead (:func:`masked_hessians`), so the rows ``O`` stay zero.

The second term is a ``Gather`` of ``|O|`` channels and a ``[.., |O|] x [|O|, N]`` FP MatMul,
added to the op's output (after its bias ``Add``, which ONNX Runtime fuses into the GEMM).

This is the alternative to smoothing where smoothing would cost a runtime op: a group no
constant can absorb, or GELU's output under ``--target onnxruntime`` (folding 1/s into GELU's
scalar breaks ORT's GELU fusion; an explicit ``Mul`` is a full pass over a ``[tokens, 4H]``
tensor that ORT's CPU kernels cannot fuse). The channels are ``max|X_j| > ratio * p99_j(max|X_j|)``
(:func:`outlier_channels`): at most 1% of them by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from onnx import helper

from passes.ir.graph import GraphView, attribute
from passes.linear import LinearKind, LinearOp
from passes.ir.naming import NameFactory
from passes.ort_lowering import fusible_bias_add

DEFAULT_RATIO = 2.0
PERCENTILE = 99.0


def outlier_channels(amax: np.ndarray, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """Indices (sorted, int64) of the channels with ``amax_j > ratio * percentile_99(amax)``.

    ``amax``: ``[C]`` calibrated ``max|X_j|``, finite. ``ratio`` >= 1 keeps the result under 1% of C."""
    if amax.ndim != 1:
        raise ValueError(f"amax must be [C], got shape {amax.shape}")
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if amax.size == 0 or not np.all(np.isfinite(amax)):
        return np.zeros(0, dtype=np.int64)
    threshold = ratio * float(np.percentile(np.abs(amax), PERCENTILE))
    return np.flatnonzero(np.abs(amax) > threshold).astype(np.int64)


@dataclass(frozen=True)
class SplitOp:
    """What :func:`split_outliers` did to one op: ``weight`` is the masked copy it now reads."""

    op: str
    weight: str
    channels: np.ndarray  # int64 [|O|], input channels of the weight computed in FP


def splittable(view: GraphView, op: LinearOp) -> str | None:
    """Why ``op`` cannot be split (None: it can)."""
    if op.kind is LinearKind.CONV:
        return "a Conv's input channels are not its last axis"
    if op.node.input[1] not in view.initializers or op.node.input[1] in view.graph_inputs:
        return f"its weight {op.node.input[1]!r} is not an initializer it reads directly"
    if op.kind is LinearKind.GEMM and attribute(op.node, "transA", 0):
        return "Gemm with transA=1"
    return None


def plan_split(view: GraphView, ops: list[LinearOp], amax: np.ndarray | None, ratio: float) -> np.ndarray | str:
    """The outlier channels (non-empty) to split off the input ``ops`` share, or why there are none."""
    why = next((f"{op.name}: {r}" for op in ops if (r := splittable(view, op))), None)
    if why is not None:
        return f"outlier channels not split ({why})"
    if amax is None:
        return "no channel statistics"
    idx = outlier_channels(amax, ratio)
    return idx if len(idx) else f"no channel's max|X| exceeds {ratio:g}x the 99th percentile"


def split_outliers(view: GraphView, ops: list[LinearOp], activation: str, channels: np.ndarray,
                   names: NameFactory, *, tidy: bool = True) -> list[SplitOp]:
    """Rewrite every op of ``ops`` (all reading ``activation``; check :func:`splittable` first) as
    ``X W_m + Gather(X, O) W[O]``. One Gather serves them all. Returns what was done, op by op.
    ``tidy=False``: the view is not re-indexed and the replaced weights stay; a caller splitting
    many groups whose outputs the others do not read does both once, after its last call."""
    index = names.outlier_index(activation)
    gathered = names.outlier_channels(activation)
    view.set_initializer(index, channels.astype(np.int64))
    done, placements = [], []
    for op in ops:
        node = op.node
        w = view.store.array(node.input[1])
        k_axis = op.weight_in_axis
        rows = np.take(w, channels, axis=k_axis)
        rows = rows if k_axis == 0 else rows.T  # [|O|, N]
        if op.kind is LinearKind.GEMM:
            rows = rows * np.asarray(attribute(node, "alpha", 1.0), dtype=w.dtype)
        masked = w.copy()
        if k_axis == 0:
            masked[channels] = 0
        else:
            masked[:, channels] = 0
        tail = _tail(view, node, rows.shape[1])  # the index is still the unedited graph's
        masked_name = names.masked_weight(node.input[1])
        view.set_initializer(masked_name, masked)
        node.input[1] = masked_name
        rows_name = names.outlier_weight(masked_name)
        view.set_initializer(rows_name, np.ascontiguousarray(rows))
        output = tail.output[0]
        partial = names.partial_output(output)
        tail.output[0] = partial
        product = names.outlier_product(output)
        placements += [(helper.make_node("MatMul", [gathered, rows_name], [product], name=names.outlier_matmul(output)),
                        tail),
                       (helper.make_node("Add", [partial, product], [output], name=names.outlier_add(output)), tail)]
        done.append(SplitOp(op.name, masked_name, channels))
    view.insert(placements, after=True)
    position = {id(n): i for i, n in enumerate(view.graph.node)}
    first = min((op.node for op in ops), key=lambda n: position[id(n)])
    view.insert([(helper.make_node("Gather", [activation, index], [gathered], axis=-1,
                                   name=names.outlier_gather(activation)), first)])
    if tidy:
        view.rebuild()
        view.drop_unused_initializers()
    return done


def _tail(view: GraphView, node, n: int):
    """The node whose output gets the FP term: a MatMul's bias ``Add``, if ONNX Runtime's lowering
    would fuse it into the GEMM (:func:`passes.ort_lowering.fusible_bias_add`; an Add in between
    would stop it), else the op itself."""
    return (fusible_bias_add(view, node, n) if node.op_type == "MatMul" else None) or node


class _DeadInputs(Mapping):
    """``hessians`` with the split channels of some weights' inputs zeroed (rows and columns)."""

    def __init__(self, hessians: Mapping[str, np.ndarray | None], dead: dict[str, np.ndarray]):
        self._hessians, self._dead = hessians, dead

    def __getitem__(self, weight: str) -> np.ndarray | None:
        h = self._hessians[weight]
        if h is None or weight not in self._dead:
            return h
        h = np.array(h, copy=True)
        h[self._dead[weight], :] = 0
        h[:, self._dead[weight]] = 0
        return h

    def __iter__(self) -> Iterator[str]:
        return iter(self._hessians)

    def __len__(self) -> int:
        return len(self._hessians)


def masked_hessians(hessians: Mapping[str, np.ndarray | None] | None,
                    splits: list[SplitOp]) -> Mapping[str, np.ndarray | None] | None:
    """GPTQ's ``Σ xᵀx`` per weight, with each split weight's FP channels dead: a dead input moves
    no other row and no row moves it (:func:`passes.gptq.gptq_round`), so its zero row stays zero."""
    if hessians is None or not splits:
        return hessians
    return _DeadInputs(hessians, {s.weight: s.channels for s in splits})
