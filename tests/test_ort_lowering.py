"""The ONNX Runtime lowering pass: Q/DQ MatMuls -> MatMulIntegerToFloat, same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from passes.ir.graph import GraphView, ensure_opset_import
from passes.ir.onnx_io import LoadedModel, TensorStore
from passes.ort_lowering import MS_DOMAIN, MS_VERSION, lower_for_onnxruntime


def graph(rng) -> onnx.ModelProto:
    """Four quantized MatMuls: bias add (bias first), no bias, per-tensor weight scale, and one
    whose weight zero point is not 0 (not lowered)."""
    model = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[N, 16] x) => (float[N, 8] y1, float[N, 8] y2, float[N, 8] y3, float[N, 8] y4) {
            xq = QuantizeLinear (x, a, z)
            xd = DequantizeLinear (xq, a, z)
            w1d = DequantizeLinear <axis = 1> (w1, s1, z1)
            m1 = MatMul (xd, w1d)
            y1 = Add (b1, m1)
            w2d = DequantizeLinear <axis = 1> (w2, s2, z2)
            y2 = MatMul (xd, w2d)
            w3d = DequantizeLinear (w3, s3)
            y3 = MatMul (xd, w3d)
            w4d = DequantizeLinear <axis = 1> (w4, s4, z4)
            y4 = MatMul (xd, w4d)
        }""")
    q = lambda shape: rng.integers(-127, 128, shape).astype(np.int8)  # noqa: E731
    pos = lambda n: (rng.random(n) * 0.02 + 0.001).astype(np.float32)  # noqa: E731
    inits = {"a": np.array(0.05, np.float32), "z": np.array(120, np.uint8),
             "w1": q((16, 8)), "s1": pos(8), "z1": np.zeros(8, np.int8), "b1": rng.standard_normal(8).astype(np.float32),
             "w2": q((16, 8)), "s2": pos(8), "z2": np.zeros(8, np.int8),
             "w3": q((16, 8)), "s3": np.array(0.01, np.float32),
             "w4": q((16, 8)), "s4": pos(8), "z4": np.full(8, 3, np.int8)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(model)
    return model


def outputs(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_lowered_matmuls_compute_the_qdq_graph():
    rng = np.random.default_rng(0)
    model = graph(rng)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    view = GraphView(model.graph, TensorStore(LoadedModel(model, Path("memory.onnx"))))
    report = lower_for_onnxruntime(view)
    ensure_opset_import(model, MS_DOMAIN, MS_VERSION)
    assert len(report.lowered) == 3
    assert report.bias_fused == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and ops.count("MatMul") == 1 and "Add" not in ops
    assert ops.count("DequantizeLinear") == 2  # the activation's (still read by y4) and w4's
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((5, 16)).astype(np.float32) * 3
        for want, got in zip(outputs(reference, x, optimize=False), outputs(model, x, optimize=True)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nothing_to_lower_leaves_the_graph_alone():
    model = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[N, 4] x, float[4, 2] w) => (float[N, 2] y) {
            y = MatMul (x, w)
        }""")
    before = model.SerializeToString()
    view = GraphView(model.graph, TensorStore(LoadedModel(model, Path("memory.onnx"))))
    assert lower_for_onnxruntime(view).lowered == []
    assert model.SerializeToString() == before
