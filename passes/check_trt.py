"""``python -m passes.check_trt MODEL.onnx``: check TensorRT's explicit-quantization rules.

Works on any ONNX file with QuantizeLinear/DequantizeLinear (ours or another tool's) and
prints every violation with the node it concerns. TensorRT's rules for Q/DQ networks
(Developer Guide, "Explicit Quantization"), one :class:`Rule` each:

- zero points are all zero, of type INT8 or FLOAT8E4M3FN (TensorRT has no UINT8 Q/DQ);
- scales are constants, positive and finite, of a float type (the Q input's type);
- per-axis scales only on constant weights, one scale per element of the quantized axis;
  activations are quantized per tensor;
- stored INT8 weights lie in [-127, 127] (symmetric), stored FP8 weights are finite;
- every QuantizeLinear feeds DequantizeLinear nodes only (Q/DQ come in pairs);
- a GEMM (MatMul/Gemm/Conv/ConvTranspose) with a dequantized input has both inputs
  dequantized, or TensorRT runs it in floating point;
- FP8 Q/DQ need opset >= 19;
- no Q/DQ node produces a graph output.

A QuantizeLinear without a zero point outputs ONNX's default type, UINT8 (or its ``output_dtype``,
opset 21), which TensorRT does not take. If/Loop/Scan bodies are checked like the main graph, with
the constants of the enclosing scopes; a violation there names the node as ``outer/inner``.

Exit codes: 0 no violation, 1 violations (or an unreadable model), 2 usage.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from passes.ir.errors import SmoothQuantError
from passes.ir.graph import GraphView, attribute, declared_dtype, opset_version, subgraphs
from passes.ir.onnx_io import LoadedModel, TensorStore, load_model

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Ops TensorRT lets sit between a weight's DQ and its GEMM (it folds them into the constant).
WEIGHT_PASSTHROUGH = ("Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze")
FP8 = onnx.TensorProto.FLOAT8E4M3FN
ZERO_POINT_TYPES = (onnx.TensorProto.INT8, FP8, onnx.TensorProto.INT4)


class Rule(enum.Enum):
    ZERO_POINT_ZERO = "zero-point-zero"
    ZERO_POINT_TYPE = "zero-point-type"
    SCALE_CONSTANT = "scale-constant"
    SCALE_VALUE = "scale-value"
    SCALE_TYPE = "scale-type"
    PER_AXIS_ON_WEIGHTS = "per-axis-on-weights"
    AXIS_LENGTH = "axis-length"
    WEIGHT_RANGE = "weight-range"
    Q_FEEDS_DQ = "q-feeds-dq"
    GEMM_BOTH_DQ = "gemm-both-dq"
    FP8_OPSET = "fp8-opset"
    NO_QDQ_OUTPUT = "no-qdq-output"


@dataclass(frozen=True)
class Violation:
    rule: Rule
    node: str  # the node's name (or its first output when unnamed)
    message: str

    def __str__(self) -> str:
        return f"[{self.rule.value}] {self.node}: {self.message}"


@dataclass
class CheckReport:
    violations: list[Violation] = field(default_factory=list)
    qdq_nodes: int = 0
    quantized_gemms: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        head = (f"{self.qdq_nodes} Q/DQ nodes, {self.quantized_gemms} quantized GEMMs: "
                + ("no TensorRT rule violated" if self.ok else f"{len(self.violations)} violations"))
        return "\n".join([head] + [f"  {v}" for v in self.violations])


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _dequantized(view: GraphView, tensor: str) -> bool:
    """True if ``tensor`` is a DequantizeLinear output, possibly through weight pass-through ops."""
    for _ in range(8):
        node = view.producer.get(tensor)
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type not in WEIGHT_PASSTHROUGH:
            return False
        tensor = node.input[0]
    return False


def _check_qdq(view: GraphView, node: onnx.NodeProto, opset: int, out: list[Violation], scope: str = "") -> None:
    name = scope + _name(node)

    def bad(rule: Rule, message: str) -> None:
        out.append(Violation(rule, name, message))

    x, scale_name = node.input[0], node.input[1]
    zero_name = node.input[2] if len(node.input) > 2 else ""
    scale = view.constant_value(scale_name)
    if scale is None:
        bad(Rule.SCALE_CONSTANT, f"scale {scale_name!r} is computed at run time, not a constant")
    else:
        if not np.issubdtype(scale.dtype, np.floating) and str(scale.dtype) != "bfloat16":
            bad(Rule.SCALE_TYPE, f"scale {scale_name!r} is {scale.dtype}, not a float type")
        elif node.op_type == "QuantizeLinear" and view.constant_value(x) is None \
                and declared_dtype(view, x) not in (None, scale.dtype):
            bad(Rule.SCALE_TYPE, f"scale {scale_name!r} is {scale.dtype} but input {x!r} is {declared_dtype(view, x)}")
        values = scale.astype(np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values > 0):
            bad(Rule.SCALE_VALUE, f"scale {scale_name!r} has non-positive or non-finite values "
                                  f"(min {values.min():.3g}, max {values.max():.3g})")
    zero = None
    if zero_name:
        zero_type = _elem_type(view, zero_name)
        zero = view.constant_value(zero_name)
        if zero_type is not None and zero_type not in ZERO_POINT_TYPES:
            bad(Rule.ZERO_POINT_TYPE, f"zero point {zero_name!r} is {onnx.TensorProto.DataType.Name(zero_type)}; "
                                      f"TensorRT takes INT8 or FLOAT8E4M3FN")
        if zero is None:
            bad(Rule.ZERO_POINT_ZERO, f"zero point {zero_name!r} is not a constant")
        elif np.any(zero.astype(np.float64) != 0):
            bad(Rule.ZERO_POINT_ZERO, f"zero point {zero_name!r} is not all zero")
        if zero_type == FP8 and opset < 19:
            bad(Rule.FP8_OPSET, f"FP8 Q/DQ need opset >= 19, the model has {opset}")
    output_dtype = attribute(node, "output_dtype", 0) if node.op_type == "QuantizeLinear" else 0
    if output_dtype and output_dtype not in ZERO_POINT_TYPES:
        bad(Rule.ZERO_POINT_TYPE, f"output_dtype is {onnx.TensorProto.DataType.Name(output_dtype)}; "
                                  f"TensorRT takes INT8 or FLOAT8E4M3FN")
    elif not zero_name and not output_dtype and node.op_type == "QuantizeLinear":
        bad(Rule.ZERO_POINT_TYPE, "no zero point, so ONNX's QuantizeLinear outputs UINT8, which TensorRT does not "
                                  "take: give an INT8 (or FLOAT8E4M3FN) zero point of 0")
    elif not zero_name and node.op_type == "DequantizeLinear":
        x_type = _elem_type(view, x)
        if x_type is not None and x_type not in ZERO_POINT_TYPES:
            bad(Rule.ZERO_POINT_TYPE, f"input {x!r} is {onnx.TensorProto.DataType.Name(x_type)}; "
                                      f"TensorRT takes INT8 or FLOAT8E4M3FN")

    per_axis = scale is not None and scale.size > 1
    block = attribute(node, "block_size", 0)
    data = view.constant_value(x)
    weight = data
    q = view.producer.get(x)
    if weight is None and node.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear":
        weight = view.constant_value(q.input[0])  # FP weight -> Q -> DQ: TensorRT folds the pair
    if per_axis and weight is None:
        bad(Rule.PER_AXIS_ON_WEIGHTS, f"{scale.size} scales on activation {x!r}: activations are quantized "
                                      f"per tensor, per-axis scales only on constant weights")
    if per_axis and weight is not None and not block:
        axis = attribute(node, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        if not 0 <= axis < weight.ndim or scale.ndim != 1 or scale.size != weight.shape[axis]:
            bad(Rule.AXIS_LENGTH, f"scale {scale_name!r} has shape {list(scale.shape)} but {x!r} has shape "
                                  f"{list(weight.shape)} and axis={attribute(node, 'axis', 1)}")
    if data is not None:
        if node.op_type == "DequantizeLinear" and data.dtype == np.int8 and data.size and data.min() < -127:
            bad(Rule.WEIGHT_RANGE, f"weight {x!r} holds -128: INT8 weights must be symmetric in [-127, 127]")
        elif _elem_type(view, x) == FP8 and not np.all(np.isfinite(data.astype(np.float32))):
            bad(Rule.WEIGHT_RANGE, f"FP8 weight {x!r} holds NaN")
        elif node.op_type == "QuantizeLinear" and not np.all(np.isfinite(data.astype(np.float64))):
            bad(Rule.WEIGHT_RANGE, f"weight {x!r} holds non-finite values")

    if node.op_type == "QuantizeLinear":
        readers = [c for c in view.consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if readers:
            bad(Rule.Q_FEEDS_DQ, f"output {node.output[0]!r} is read by {readers[0].op_type} node "
                                 f"{_name(readers[0])!r}, not by a DequantizeLinear")
    if node.output[0] in view.graph_outputs:
        bad(Rule.NO_QDQ_OUTPUT, f"produces graph output {node.output[0]!r}")


def _elem_type(view: GraphView, tensor: str) -> int | None:
    source = view.constant_source(tensor)
    if source is not None:
        return view.store.proto(source).data_type
    node = view.producer.get(tensor)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return attr.t.data_type
    return None


def check_graph(view: GraphView, opset: int) -> CheckReport:
    """Every violation of TensorRT's explicit-quantization rules in ``view``'s graph and its bodies."""
    report = CheckReport()
    _check_nodes(view, opset, report, "")
    return report


def _check_nodes(view: GraphView, opset: int, report: CheckReport, scope: str) -> None:
    for node in view.graph.node:
        for body in subgraphs(node):
            _check_nodes(view.body(body), opset, report, f"{scope}{_name(node)}/")
        if node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx"):
            report.qdq_nodes += 1
            _check_qdq(view, node, opset, report.violations, scope)
        elif node.op_type in GEMM_OPS and len(node.input) >= 2:
            dq = [_dequantized(view, t) for t in node.input[:2]]
            if all(dq):
                report.quantized_gemms += 1
            elif any(dq):
                plain = node.input[dq.index(False)]
                report.violations.append(Violation(
                    Rule.GEMM_BOTH_DQ, scope + _name(node),
                    f"input {plain!r} is not dequantized while the other input is: TensorRT runs this "
                    f"{node.op_type} in floating point"))


def check_model(model: str | os.PathLike | LoadedModel) -> CheckReport:
    """Check an ONNX file (external data is read lazily, only for Q/DQ constants)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    return check_graph(view, opset_version(loaded.proto))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passes.check_trt", description=__doc__.splitlines()[0])
    p.add_argument("model", help="ONNX model with QuantizeLinear/DequantizeLinear nodes")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        report = check_model(args.model)
    except SmoothQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = report.summary()
    print(text.splitlines()[0] if args.quiet else text)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
