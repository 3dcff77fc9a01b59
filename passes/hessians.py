"""What GPTQ rounds against: ``H[w] = Σ xᵀx`` of each weight's op inputs, once smoothed.

The second moments of the FP model's linear inputs are measured in the calibration pass
(:func:`gram_requests` picks them, within a memory budget, in graph order); smoothing then
changes each by a diagonal (:class:`calibrators.gram.SmoothedHessians`). Weights whose inputs
did not fit the budget (a 7B model's MLP inputs) are measured afterwards on the smoothed model,
a chunk per pass (:class:`calibrators.gram.WeightHessians`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibrators.data import CalibrationData
from calibrators.gram import GRAM_BUDGET_BYTES, SmoothedHessians, WeightHessians
from passes.config import QuantizationConfig, WeightRounding
from passes.ir.graph import GraphView
from passes.ir.onnx_io import LoadedModel
from passes.linear import LinearKind, LinearOp
from passes.smooth import PlannedGroup


def _rounds_by_gptq(view: GraphView, op: LinearOp, weight: str) -> bool:
    return op.kind is not LinearKind.CONV and len(view.store.proto(weight).dims) == 2


def gram_requests(view: GraphView, ops: Sequence[LinearOp], config: QuantizationConfig | None,
                  budget: int | None = None) -> dict[str, int]:
    """FP activations (name -> channels) whose ``Σ xᵀx`` the calibration pass should measure for
    GPTQ: the inputs of the 2-D MatMul/Gemm ops it may quantize, in graph order, as many as fit in
    ``budget`` bytes of float32 sums (as :class:`calibrators.gram.WeightHessians` counts: the pass
    holds as much again in each batch's products); None: :data:`GRAM_BUDGET_BYTES`."""
    if config is None or config.weight_rounding is not WeightRounding.GPTQ:
        return {}
    budget = GRAM_BUDGET_BYTES if budget is None else budget
    out, size = {}, 0
    for op in ops:
        if (op.activation in out or config.why_kept_fp(op.name, op.node.op_type) is not None
                or not _rounds_by_gptq(view, op, op.weight)):
            continue
        c = int(view.store.proto(op.weight).dims[op.weight_in_axis])
        if size + 4 * c * c > budget:
            break
        out[op.activation] = c
        size += 4 * c * c
    return out


def weight_hessians(loaded: LoadedModel, view: GraphView, ops: Sequence[LinearOp], planned: Sequence[PlannedGroup],
                    grams: dict[str, np.ndarray], data: CalibrationData | None, messages: list[str], *,
                    progress: bool = True) -> SmoothedHessians:
    """``H`` per weight initializer (as ``view`` now names it: smoothing may have cloned weights)
    of ``ops``: from the calibration pass's ``grams`` where every op reading the weight has its
    FP input there, else measured on the smoothed graph (``data``; None: nothing left to measure)."""
    scales = {id(op.node): p.scales for p in planned for op in p.group.consumers}
    readers: dict[str, list[LinearOp]] = {}
    for op in ops:
        weight = view.constant_source(op.node.input[1])  # the weight now (smoothing may have cloned op.weight)
        if not _rounds_by_gptq(view, op, weight):
            messages.append(f"{op.name}: GPTQ rounds 2-D MatMul/Gemm weights; this op's weight is rounded to nearest")
            continue
        readers.setdefault(weight, []).append(op)
    covered = {w: [(op.activation, scales.get(id(op.node))) for op in rs] for w, rs in readers.items()
               if all(op.activation in grams for op in rs)}
    rest = {w: [(op.node.input[0], int(view.store.proto(w).dims[op.weight_in_axis])) for op in rs]
            for w, rs in readers.items() if w not in covered}
    measured = WeightHessians(loaded, loaded.proto, rest, data, progress=progress) if rest and data else None
    return SmoothedHessians(covered, grams, measured)


def report_hessians(hessians: SmoothedHessians | None, messages: list[str]) -> None:
    if hessians is None:
        return
    if hessians.passes:
        messages.append(f"GPTQ: input second moments of {hessians.passes} chunk(s) measured in extra pass(es) over "
                        f"the calibration data (beyond the calibration pass's budget)")
    messages += [f"weight {w!r}: its ops' inputs are not finite on the calibration data; rounded to nearest instead "
                 f"of GPTQ" for w in hessians.non_finite]
