"""Per-token dynamic W8A8 (SmoothQuant "O1"): one activation scale per token, computed at run time.

For each MatMul/Gemm ``Y = X W (+ b)`` with smoothed X ``[..., K]`` and weight quantized per
output channel (``W_q``, ``w [N]``, as in :mod:`passes.qdq`)::

    a    = max_k |X[..., k]| / qmax                       [..., 1]  (one scale per token; 1 on zero rows)
    X_q  = sat(round(X / a))                              int8 (or E4M3FN)
    Y    = (X_q W_q) * a * w (+ b)                        accumulator rescaled on the outer dims only

Two lowerings of this one semantics, by :class:`Target`:

- ``onnxruntime``, INT8: standard ops, so ONNX Runtime's CPU runs a real integer GEMM:
  ``ReduceMax(Abs(X)) / 127 -> Max(., tiny) -> Div -> Round -> Clip -> Cast(int8) ->
  MatMulInteger(X_q, W_q) -> Cast(float) -> Mul(a) -> Mul(w) [-> Add(b)]``.
  FP8 (no CPU FP8 GEMM): the same with ``Cast(X / a -> float8e4m3fn -> float)`` and a float
  MatMul against the dequantized FP8 weight (numerically the W8A8 FP8 result).
- ``tensorrt``: the ``com.smoothquant`` custom ops ``QuantizePerToken`` and ``W8A8Linear``
  (schema in :mod:`plugins.schema`), implemented by the TensorRT plugins.

Conv ops, Gemm with alpha/beta != 1 and ops whose weight is not 2-D stay FP and are reported.
With ``tensorrt`` the caller adds the ``com.smoothquant`` opset import to the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from passes.config import Precision, QuantizationConfig, Target
from passes.ir.errors import SmoothQuantError
from passes.ir.graph import GraphView, activation_dtype, attribute, make_reduce
from passes.linear import LinearKind, LinearOp
from passes.ir.naming import NameFactory
from passes.qdq import FORMATS, QuantReport, per_channel_weight_scale, quantize_weight
from plugins import schema

TINY = 1e-12


def quantize_per_token(view: GraphView, linear_ops: list[LinearOp], opset: int, config: QuantizationConfig,
                       hessians: Mapping[str, np.ndarray | None] | None = None, *,
                       progress: bool = False) -> QuantReport:
    """Rewrite every op of ``linear_ops`` to per-token dynamic W8A8; returns what was done.
    ``hessians``: per weight initializer, ``Σ xᵀx`` of its ops' inputs, for GPTQ rounding."""
    fmt = FORMATS[config.precision]
    if config.precision is Precision.FP8 and opset < 19:
        raise SmoothQuantError(f"FP8 casts need opset >= 19, the model has {opset}")
    if opset < 13:
        raise SmoothQuantError(f"per-token lowering needs opset >= 13, the model has {opset}")
    names = NameFactory(view.all_names())
    scalars = _Scalars(view, names)
    report = QuantReport(config.precision, gptq=hessians is not None)
    plan: list[tuple[LinearOp, list[onnx.NodeProto]]] = []
    custom = config.target is Target.TENSORRT
    for op in tqdm(linear_ops, desc="rounding weights (GPTQ)", unit="op", leave=False,
                   disable=not (progress and hessians)):
        node = op.node
        if op.kind is LinearKind.CONV:
            report.skipped.append((op.name, "per-token quantization applies to MatMul/Gemm, not Conv"))
            continue
        if op.kind is LinearKind.GEMM and (attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0):
            report.skipped.append((op.name, "Gemm with alpha or beta other than 1"))
            continue
        source = view.constant_source(node.input[1])
        w = view.store.array(source)
        if w.ndim != 2:
            report.skipped.append((op.name, f"weight has rank {w.ndim}, not 2"))
            continue
        w_kn = w if op.weight_out_axis == 1 else w.T  # [K, N]
        dtype = activation_dtype(view, node.input[0])
        # the plugins take float32 scales; the ONNX lowering rescales in the activation type
        w_scale = per_channel_weight_scale(w_kn, 1, fmt.qmax, np.dtype(np.float32) if custom else dtype)
        w_q = quantize_weight(w_kn, w_scale, 1, fmt, (hessians or {}).get(source))  # [K, N]
        bias = node.input[2] if op.kind is LinearKind.GEMM and len(node.input) > 2 and node.input[2] else None
        x, y = node.input[0], node.output[0]
        tag = op.name
        if custom:
            nodes = _custom_ops(view, names, tag, x, y, np.ascontiguousarray(w_q.T), w_scale, bias, config, dtype)
        elif config.precision is Precision.INT8:
            nodes = _integer_ops(view, names, scalars, tag, x, y, w_q, w_scale, bias, dtype, opset)
        else:
            nodes = _float8_ops(view, names, scalars, tag, x, y, w_q, w_scale, bias, dtype, opset)
        plan.append((op, nodes))
        report.quantized.append(op.name)
    view.insert([(new, op.node) for op, nodes in plan for new in nodes])  # each op's lowering in its place
    replaced = {id(op.node) for op, _ in plan}
    for i in reversed([i for i, n in enumerate(view.graph.node) if id(n) in replaced]):
        del view.graph.node[i]
    view.rebuild()
    view.drop_unused_initializers()
    return report


def _const(view: GraphView, names: NameFactory, base: str, value: np.ndarray) -> str:
    name = names.unique(base)
    view.set_initializer(name, np.asarray(value))
    return name


class _Scalars:
    """One initializer per distinct scalar constant (tiny, 1/qmax, clip bounds), shared by all ops."""

    def __init__(self, view: GraphView, names: NameFactory):
        self.view, self.names, self.made = view, names, {}

    def __call__(self, label: str, value, dtype) -> str:
        """``value`` a number (0-d constant) or a list (1-D constant)."""
        key = (label, np.dtype(dtype).str, repr(value))
        if key not in self.made:
            self.made[key] = _const(self.view, self.names, f"sq_pt_{label}", np.array(value, dtype))
        return self.made[key]


def _token_scale(view, names, scalars, tag, x, dtype, qmax, opset, nodes) -> str:
    """``a = max(max_k |x|, tiny) / qmax`` with shape [..., 1], in x's dtype."""
    def out(s):
        return names.unique(f"{tag}::sq_pt_{s}")

    abs_x, amax, safe, a = out("abs"), out("amax"), out("amax_safe"), out("scale")
    nodes.append(helper.make_node("Abs", [x], [abs_x], name=names.unique(f"{abs_x}::node")))
    nodes.append(make_reduce("ReduceMax", abs_x, amax, [-1], opset, names.unique(f"{amax}::node"), 1,
                             lambda value: scalars("last_axis", value.tolist(), np.int64)))
    tiny = scalars("tiny", TINY * qmax, dtype)
    nodes.append(helper.make_node("Max", [amax, tiny], [safe], name=names.unique(f"{safe}::node")))
    inv_qmax = scalars("inv_qmax", 1.0 / qmax, dtype)
    nodes.append(helper.make_node("Mul", [safe, inv_qmax], [a], name=names.unique(f"{a}::node")))
    return a


def _rescale(view, names, tag, acc, a, w_scale, bias, y, dtype, nodes) -> None:
    """``y = acc * a * w (+ b)``."""
    def out(s):
        return names.unique(f"{tag}::sq_pt_{s}")

    row, both = out("row_scaled"), out("scaled")
    w_name = _const(view, names, f"{tag}::sq_pt_w_scale", w_scale.astype(dtype))
    nodes.append(helper.make_node("Mul", [acc, a], [row], name=names.unique(f"{row}::node")))
    nodes.append(helper.make_node("Mul", [row, w_name], [y if bias is None else both],
                                  name=names.unique(f"{both}::node")))
    if bias is not None:
        nodes.append(helper.make_node("Add", [both, bias], [y], name=names.unique(f"{y}::sq_pt_bias")))


def _integer_ops(view, names, scalars, tag, x, y, w_q, w_scale, bias, dtype, opset) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    a = _token_scale(view, names, scalars, tag, x, dtype, 127.0, opset, nodes)

    def out(s):
        return names.unique(f"{tag}::sq_pt_{s}")

    scaled, rounded, clipped, xq, acc_i, acc = (out(s) for s in ("div", "round", "clip", "q", "acc_int", "acc"))
    lo, hi = scalars("int8_min", -127, dtype), scalars("int8_max", 127, dtype)
    w_name = _const(view, names, f"{tag}::sq_pt_w_q", w_q)
    nodes += [helper.make_node("Div", [x, a], [scaled], name=names.unique(f"{scaled}::node")),
              helper.make_node("Round", [scaled], [rounded], name=names.unique(f"{rounded}::node")),
              helper.make_node("Clip", [rounded, lo, hi], [clipped], name=names.unique(f"{clipped}::node")),
              helper.make_node("Cast", [clipped], [xq], to=onnx.TensorProto.INT8, name=names.unique(f"{xq}::node")),
              helper.make_node("MatMulInteger", [xq, w_name], [acc_i], name=names.unique(f"{acc_i}::node")),
              helper.make_node("Cast", [acc_i], [acc], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                               name=names.unique(f"{acc}::node"))]
    _rescale(view, names, tag, acc, a, w_scale, bias, y, dtype, nodes)
    return nodes


def _float8_ops(view, names, scalars, tag, x, y, w_q, w_scale, bias, dtype, opset) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    a = _token_scale(view, names, scalars, tag, x, dtype, 448.0, opset, nodes)

    def out(s):
        return names.unique(f"{tag}::sq_pt_{s}")

    scaled, xq, xf, acc = (out(s) for s in ("div", "q", "qf", "acc"))
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w_f = _const(view, names, f"{tag}::sq_pt_w_q", w_q)  # float8e4m3fn [K, N]
    w_cast = out("w_f")
    nodes += [helper.make_node("Div", [x, a], [scaled], name=names.unique(f"{scaled}::node")),
              helper.make_node("Cast", [scaled], [xq], to=onnx.TensorProto.FLOAT8E4M3FN, saturate=1,
                               name=names.unique(f"{xq}::node")),
              helper.make_node("Cast", [xq], [xf], to=to, name=names.unique(f"{xf}::node")),
              helper.make_node("Cast", [w_f], [w_cast], to=to, name=names.unique(f"{w_cast}::node")),
              helper.make_node("MatMul", [xf, w_cast], [acc], name=names.unique(f"{acc}::node"))]
    _rescale(view, names, tag, acc, a, w_scale, bias, y, dtype, nodes)
    return nodes


def _custom_ops(view, names, tag, x, y, w_nk, w_scale, bias, config, dtype) -> list[onnx.NodeProto]:
    def out(s):
        return names.unique(f"{tag}::sq_pt_{s}")

    xq, a = out("q"), out("scale")
    w_name = _const(view, names, f"{tag}::sq_pt_w_q", w_nk)
    s_name = _const(view, names, f"{tag}::sq_pt_w_scale", w_scale.astype(np.float32))
    if bias is None:
        bias = _const(view, names, f"{tag}::sq_pt_zero_bias", np.zeros(w_nk.shape[0], np.float32))
    return [helper.make_node(schema.QUANTIZE_PER_TOKEN, [x], [xq, a], domain=schema.DOMAIN,
                             qtype=config.precision.value, plugin_namespace=schema.PLUGIN_NAMESPACE,
                             name=names.unique(f"{tag}::sq_quantize_per_token")),
            helper.make_node(schema.W8A8_LINEAR, [xq, a, w_name, s_name, bias], [y], domain=schema.DOMAIN,
                             out_dtype=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                             plugin_namespace=schema.PLUGIN_NAMESPACE, name=names.unique(f"{tag}::sq_w8a8_linear"))]
