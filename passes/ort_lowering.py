"""ONNX Runtime lowering pass: quantized MatMuls -> ``com.microsoft.MatMulIntegerToFloat``, bias fused.

For a MatMul whose inputs are both dequantized (:mod:`passes.qdq`, ``Target.ONNXRUNTIME``)::

    Y = DQ(X_q, a, z) @ DQ(W_q, w, 0, axis=1) [+ b]
      = a * w_n * ((X_q - z) @ W_q) [+ b]
      = MatMulIntegerToFloat(X_q, W_q, a, w, z, -, b)

one ONNX Runtime kernel: uint8 x int8 GEMM with int32 accumulation, the row/column rescale and
the bias add in its epilogue. ONNX Runtime's own optimizer reaches the same kernel from the
Q/DQ form but leaves the bias ``Add`` as a separate pass over every GEMM output (about 10% of
MiniLM's run time on 2 CPU cores), and it cannot fuse the bias later because the scale product
is constant-folded first. Numerically nothing changes: the kernel is the one ORT runs anyway.

Lowered only where the kernel applies exactly: MatMul, float32 activations, a per-tensor
activation scale and zero point, an int8 initializer weight of rank 2 with per-output-channel
(axis 1) or per-tensor scales and zero zero points. The bias is fused when the MatMul's only
reader is an ``Add`` of a constant ``[N]`` vector. Anything else keeps its Q/DQ form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from passes.ir.graph import GraphView, attribute

MS_DOMAIN = "com.microsoft"
MS_VERSION = 1
KERNEL = "MatMulIntegerToFloat"


@dataclass
class LoweringReport:
    lowered: list[str] = field(default_factory=list)  # MatMul node names
    bias_fused: int = 0

    def summary(self) -> str:
        return (f"onnxruntime lowering: {len(self.lowered)} MatMuls -> {MS_DOMAIN}.{KERNEL} "
                f"({self.bias_fused} with the bias add fused)")


def lower_for_onnxruntime(view: GraphView) -> LoweringReport:
    """Rewrite ``view.graph`` in place. The caller adds the ``com.microsoft`` opset import
    (:data:`MS_DOMAIN`, version :data:`MS_VERSION`) to the model when anything was lowered."""
    report = LoweringReport()
    replaced: dict[int, onnx.NodeProto] = {}  # id(old MatMul) -> new node
    removed: set[int] = set()
    for node in list(view.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x_dq, w_dq = view.producer.get(node.input[0]), view.producer.get(node.input[1])
        if not (_activation_dq(view, x_dq) and _weight_dq(view, w_dq)):
            continue
        inputs = [x_dq.input[0], w_dq.input[0], x_dq.input[1], w_dq.input[1],
                  x_dq.input[2] if len(x_dq.input) > 2 else "", ""]
        output = node.output[0]
        add = fusible_bias_add(view, node, view.store.proto(w_dq.input[0]).dims[1])
        if add is not None:
            bias = add.input[1] if add.input[0] == output else add.input[0]
            inputs.append(bias)
            output = add.output[0]
            removed.add(id(add))
            report.bias_fused += 1
        while inputs and not inputs[-1]:
            inputs.pop()
        replaced[id(node)] = helper.make_node(KERNEL, inputs, [output], name=node.name, domain=MS_DOMAIN)
        report.lowered.append(node.name)
    if not replaced:
        return report
    nodes = [replaced.get(id(n), n) for n in view.graph.node if id(n) not in removed]
    del view.graph.node[:]
    view.graph.node.extend(nodes)
    view.rebuild()
    _drop_dead_dequantize(view)
    view.drop_unused_initializers()
    return report


def _scalar(view: GraphView, name: str, dtype) -> bool:
    source = view.constant_source(name) if name else None
    if source is None:
        return False
    proto = view.store.proto(source)
    return int(np.prod(proto.dims, dtype=np.int64)) == 1 and proto.data_type == dtype


def _activation_dq(view: GraphView, dq: onnx.NodeProto | None) -> bool:
    """DQ(X_q, a, z) with a scalar float32 scale and a scalar uint8/int8 zero point."""
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
        return False
    zero_ok = len(dq.input) < 3 or not dq.input[2] or any(
        _scalar(view, dq.input[2], t) for t in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8))
    return _scalar(view, dq.input[1], onnx.TensorProto.FLOAT) and zero_ok and view.constant_source(dq.input[0]) is None


def _weight_dq(view: GraphView, dq: onnx.NodeProto | None) -> bool:
    """DQ(W_q, w, 0) of a rank-2 int8 initializer, per output channel (axis 1) or per tensor."""
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
        return False
    source = view.constant_source(dq.input[0])
    if source is None or source != dq.input[0]:
        return False
    w = view.store.proto(source)
    if w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2:
        return False
    scale_src = view.constant_source(dq.input[1])
    if scale_src is None or view.store.proto(scale_src).data_type != onnx.TensorProto.FLOAT:
        return False
    scale_size = int(np.prod(view.store.proto(scale_src).dims, dtype=np.int64))
    axis = attribute(dq, "axis", 1)
    if not (scale_size == 1 or (scale_size == w.dims[1] and axis in (1, -1))):
        return False
    if len(dq.input) > 2 and dq.input[2]:
        zero = view.constant_source(dq.input[2])
        if zero is None or np.any(view.store.array(zero) != 0):
            return False
    return True


def fusible_bias_add(view: GraphView, matmul: onnx.NodeProto, n: int) -> onnx.NodeProto | None:
    """The MatMul's only reader, if it is ``Add(Y, b)`` with a constant float32 ``b`` of shape ``[N]``."""
    y = matmul.output[0]
    readers = view.consumers.get(y, [])
    if len(readers) != 1 or y in view.graph_outputs:
        return None
    add = readers[0]
    if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    bias = add.input[1] if add.input[0] == y else add.input[0]
    source = view.constant_source(bias)
    if source is None or source != bias:
        return None
    proto = view.store.proto(source)
    return add if list(proto.dims) == [n] and proto.data_type == onnx.TensorProto.FLOAT else None


def _drop_dead_dequantize(view: GraphView) -> None:
    """DequantizeLinear nodes nothing reads any more (their Q producers stay if still read)."""
    while True:
        dead = [n for n in view.graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear")
                and not view.consumers.get(n.output[0]) and n.output[0] not in view.graph_outputs]
        if not dead:
            return
        ids = {id(n) for n in dead}
        nodes = [n for n in view.graph.node if id(n) not in ids]
        del view.graph.node[:]
        view.graph.node.extend(nodes)
        view.rebuild()
