"""Non-finite numbers: a NaN or Inf in calibration data or in the model's own activations is one clear
error naming where; a weight holding NaN/Inf is left as it is, with the reason; no scale written is
ever non-finite, for any target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.config import Target
from passes.ir.errors import SmoothQuantError
from passes.pipeline import run_smoothquant
from test_quant_options import config


def two_matmuls(path, w2=None, log=False):
    """x -> MatMul(w1) [-> Log] -> MatMul(w2) -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, 4)).astype(np.float32) if w2 is None else w2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    nodes += [helper.make_node("Log", ["h"], ["hl"], name="log")] if log else [helper.make_node("Relu", ["h"], ["hl"])]
    nodes.append(helper.make_node("MatMul", ["hl", "w2"], ["y"], name="fc2"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("row", [0, 5, 15])
def test_a_nan_in_calibration_data_is_an_error_wherever_it_sits(tmp_path, row):
    feeds = two_matmuls(tmp_path / "m.onnx")
    feeds[1]["x"][row, 3] = np.nan
    with pytest.raises(SmoothQuantError, match=rf"input 'x' holds NaN or Inf \(sample {row}\)"):
        run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=feeds, config=config())
    assert not (tmp_path / "q.onnx").exists()


def test_an_activation_the_model_makes_infinite_is_an_error(tmp_path):
    feeds = two_matmuls(tmp_path / "m.onnx", log=True)  # Log of negative / zero values: NaN and -Inf
    with pytest.raises(SmoothQuantError, match="activation 'hl' is NaN or Inf on the calibration data"):
        run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=feeds, config=config())


@pytest.mark.parametrize("target", list(Target))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_is_left_alone_with_the_reason(tmp_path, target, bad):
    w2 = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    w2[2, 1] = bad
    feeds = two_matmuls(tmp_path / "m.onnx", w2=w2)
    result = run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=feeds, config=config(target=target),)
    assert any("weight 'w2' holds NaN or Inf" in m for m in result.messages)
    assert result.quant_report.quantized == ["fc1"]
    out = onnx.load(str(tmp_path / "q.onnx"))
    for t in out.graph.initializer:
        if "scale" in t.name:
            assert np.isfinite(numpy_helper.to_array(t)).all(), t.name
