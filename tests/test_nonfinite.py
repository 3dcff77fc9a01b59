"""Bad numbers and bad calibration files: NaN or Inf in calibration data or in the model's own
activations is one error naming where; a weight holding NaN/Inf is left as it is, with the reason; no
scale written is ever non-finite, for any target; calibration files are checked from their headers
(claimed sizes, zero-length samples, a fixed batch) before any work."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.config import Target
from passes.ir.errors import SmoothQuantError
from passes.pipeline import run_smoothquant
from test_quant_options import config


def two_matmuls(path, w2=None, log=False, seq=False):
    """x -> MatMul(w1) [-> Log] -> MatMul(w2) -> y; ``seq``: x is [n, s, 8]."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, 4)).astype(np.float32) if w2 is None else w2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    nodes += [helper.make_node("Log", ["h"], ["hl"], name="log")] if log else [helper.make_node("Relu", ["h"], ["hl"])]
    nodes.append(helper.make_node("MatMul", ["hl", "w2"], ["y"], name="fc2"))
    dims = ["n", "s"] if seq else ["n"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, 4])],
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


@pytest.mark.parametrize("case, needle", [
    ("huge_header", "claims shape"),
    ("zero_length", "zero-length samples calibrate nothing"),
])
def test_calibration_files_checked_before_any_work(tmp_path, case, needle):
    """An .npz whose header claims more than it holds (10^12 samples) and samples of zero length are
    refused from the headers, before calibration starts."""
    two_matmuls(tmp_path / "m.onnx", seq=True)
    path = tmp_path / "c.npz"
    if case == "zero_length":
        np.savez(path, x=np.zeros((4, 0, 8), np.float32))
    else:  # a valid zip whose x.npy header says 10^12 samples in front of 4 samples' bytes
        npy = io.BytesIO()
        np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (10**12, 2, 8)})
        npy.write(np.zeros((4, 2, 8), np.float32).tobytes())
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", npy.getvalue())
    with pytest.raises(SmoothQuantError, match=needle):
        run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=path, config=config())


def test_a_fixed_batch_that_does_not_divide_the_samples_is_refused_first(tmp_path):
    two_matmuls(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # exported with batch 2
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 8), np.float32))
    with pytest.raises(SmoothQuantError, match="5 samples, but the model takes batches of exactly 2"):
        run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=tmp_path / "c.npz", config=config())


@pytest.mark.parametrize("bad, needle", [
    (lambda x: x.astype(np.float64), "has dtype float64"),
    (lambda x: x[:, :7], "the model expects 8"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 9, np.nan, x).astype(np.float32), "holds NaN or Inf"),
])
def test_evaluate_validates_its_data(tmp_path, bad, needle):
    from passes.evaluate import evaluate

    feeds = two_matmuls(tmp_path / "m.onnx")
    np.savez(tmp_path / "eval.npz", x=bad(feeds[0]["x"]))
    with pytest.raises(SmoothQuantError, match=needle):
        evaluate(tmp_path / "m.onnx", tmp_path / "m.onnx", tmp_path / "eval.npz")
