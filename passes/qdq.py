"""Q/DQ placement pass: W8A8 INT8 with every scale on an outer GEMM dimension.

For each linear op ``Y = X W`` (MatMul/Gemm/Conv with a constant weight)::

    X~ = DQ(Q(X, a, 0), a, 0)                a = max|X'| / 127, one scale per tensor (static)
    W~ = DQ(W_q, w, 0, axis=out)             w_n = max_k |W'[k, n]| / 127, per output channel
                                             W_q = clip(round(W' / w), -127, 127) as int8

so ``X~ W~ = a * w_n * (X_q W_q)``: the int32 accumulator is rescaled by a row scale
(tokens) and a column scale (output channels) only, which GEMM epilogues support. Zero
points are 0 (symmetric). After smoothing, ``max|X'| = max_j(max|X_j| / s_j)``, read off
the calibrated per-channel statistics with no second calibration pass.

Only GEMM inputs are quantized: never graph outputs, biases, Softmax or norm inputs.
Activations with zero or non-finite range are left in floating point and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from passes.errors import SmoothQuantError
from passes.graph import GraphView, activation_dtype
from passes.linear import LinearOp
from passes.naming import NameFactory

INT8_MAX = 127.0


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"quantization: {len(self.quantized)} linear ops quantized (INT8 W8A8), {len(self.skipped)} kept in FP"]
        lines.extend(f"  kept FP  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def per_channel_weight_scale(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """Symmetric INT8 scale per output channel (shape ``[N]``); all-zero channels get 1."""
    axes = tuple(a for a in range(weight.ndim) if a != out_axis)
    amax = np.abs(weight.astype(np.float64)).max(axis=axes)
    return np.where(amax > 0, amax / INT8_MAX, 1.0)


def quantize_weight(weight: np.ndarray, scale: np.ndarray, out_axis: int) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[out_axis] = scale.size
    q = np.round(weight.astype(np.float64) / scale.reshape(shape))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def quantize_linear_ops(view: GraphView, linear_ops: list[LinearOp], activation_amax: dict[str, float],
                        opset: int) -> QuantReport:
    """Insert Q/DQ for every op in ``linear_ops``; ``activation_amax`` is keyed by each op's current input."""
    if opset < 13:
        raise SmoothQuantError("per-channel QuantizeLinear/DequantizeLinear need opset >= 13; convert the model "
                               "with onnx.version_converter first")
    names = NameFactory(view.all_names())
    report = QuantReport()
    act_dq: dict[str, str] = {}
    weight_dq: dict[tuple[str, int], str] = {}
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (node to insert, insert before)
    for op in linear_ops:
        node, x = op.node, op.node.input[0]
        amax = activation_amax.get(x)
        if amax is None or not np.isfinite(amax) or amax <= 0:
            report.skipped.append((op.name, f"activation {x!r} has range {amax} (zero, non-finite or uncalibrated)"))
            continue
        dtype = activation_dtype(view, x)
        if x not in act_dq:
            scale = names.scale(x)
            zero = names.zero_point(x)
            view.set_initializer(scale, np.array(amax / INT8_MAX, dtype=dtype))
            view.set_initializer(zero, np.array(0, dtype=np.int8))
            q_out, dq_out = names.quantized(x), names.dequantized(x)
            new_nodes.append((helper.make_node("QuantizeLinear", [x, scale, zero], [q_out], name=names.q_node(x)), node))
            new_nodes.append((helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out],
                                               name=names.dq_node(x)), node))
            act_dq[x] = dq_out
        source = view.constant_source(node.input[1])
        key = (source, op.weight_out_axis)
        if key not in weight_dq:
            w = view.store.array(source)
            w_scale = per_channel_weight_scale(w, op.weight_out_axis)
            q_name, s_name, z_name = names.quantized(source), names.scale(source), names.zero_point(source)
            view.set_initializer(q_name, quantize_weight(w, w_scale, op.weight_out_axis))
            view.set_initializer(s_name, w_scale.astype(w.dtype))
            view.set_initializer(z_name, np.zeros(w_scale.size, dtype=np.int8))
            dq_out = names.dequantized(source)
            new_nodes.append((helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                               name=names.dq_node(source), axis=op.weight_out_axis), node))
            weight_dq[key] = dq_out
        node.input[0] = act_dq[x]
        node.input[1] = weight_dq[key]
        report.quantized.append(op.name)
    for new, before in new_nodes:
        view.graph.node.insert(list(view.graph.node).index(before), new)
    view.rebuild()
    view.drop_unused_initializers()
    return report
