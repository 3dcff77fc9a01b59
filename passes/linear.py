"""Linear ops with a constant weight: the GEMMs that smoothing and quantization act on.

For ``Y = X W`` the reduction runs over X's channel axis and W's input axis:

============  ===================  ==============  ==============  ==================
op            weight layout        W input axis    W output axis   X channel axis
============  ===================  ==============  ==============  ==================
MatMul        ``[K, N]``           0               1               last
Gemm          ``[K, N]``           0               1               last (transA=0)
Gemm transB   ``[N, K]``           1               0               last (transA=0)
Conv          ``[N, K, *kernel]``  1               0               1 (NCHW)
============  ===================  ==============  ==============  ==================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx

from passes.ir.graph import GraphView, attribute


class LinearKind(enum.Enum):
    MATMUL = "MatMul"
    GEMM = "Gemm"
    CONV = "Conv"


@dataclass(frozen=True)
class LinearOp:
    node: onnx.NodeProto
    kind: LinearKind
    activation: str
    weight: str  # the initializer holding W (resolved through Identity nodes)
    weight_in_axis: int
    weight_out_axis: int
    activation_channel_axis: int  # -1 (last) or 1 (NCHW)

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def _finite(view: GraphView, weight: str) -> bool:
    value = view.store.array(weight)
    return value.dtype.kind != "f" or bool(np.isfinite(value).all())


def find_linear_ops(view: GraphView) -> tuple[list[LinearOp], list[tuple[onnx.NodeProto, str]]]:
    """All linear ops of the main graph with a constant weight, and the ones passed over with why."""
    found, passed_over = [], []
    for node in view.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        weight = view.constant_source(node.input[1])
        if weight is None:
            continue  # activation x activation (attention scores): not a weight GEMM
        rank = len(view.store.proto(weight).dims)
        if view.constant_source(node.input[0]) is not None:
            passed_over.append((node, "both inputs are constant"))
        elif not _finite(view, weight):
            passed_over.append((node, f"weight {weight!r} holds NaN or Inf: no finite scale exists, it stays as it is"))
        elif node.op_type == "MatMul":
            if rank != 2:
                passed_over.append((node, f"weight {weight!r} has rank {rank}, not 2"))
            else:
                found.append(LinearOp(node, LinearKind.MATMUL, node.input[0], weight, 0, 1, -1))
        elif node.op_type == "Gemm":
            if attribute(node, "transA", 0):
                passed_over.append((node, "transA=1 puts the channel axis first"))
            else:
                trans_b = attribute(node, "transB", 0)
                found.append(LinearOp(node, LinearKind.GEMM, node.input[0], weight,
                                      1 if trans_b else 0, 0 if trans_b else 1, -1))
        else:
            if attribute(node, "group", 1) != 1:
                passed_over.append((node, "grouped convolution"))
            else:
                found.append(LinearOp(node, LinearKind.CONV, node.input[0], weight, 1, 0, 1))
    return found, passed_over
