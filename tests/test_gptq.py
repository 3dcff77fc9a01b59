"""GPTQ weight rounding: the pure function, the in-graph second moments, and the pipeline option."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.data import CalibrationData
from calibrators.calibrate import calibrate
from calibrators.gram import WeightHessians, collect_grams
from calibrators.minmax import StatTarget
from conftest import run
from passes import SmoothQuantConfig
from passes.config import (CalibrationConfig, Granularity, Precision, QuantizationConfig, SmoothingConfig, Target,
                           WeightRounding, WeightStorage)
from passes.ir.errors import SmoothQuantError
from passes.gptq import gptq_round, inverse_cholesky_upper
from passes.ir.onnx_io import load_model
from passes.pipeline import run_smoothquant
from passes.qdq import FORMATS, per_channel_weight_scale
from test_quantize import held_out

QUIET = CalibrationConfig(progress=False)


def correlated_rows(rng, rows: int, k: int, outlier: float = 20.0) -> np.ndarray:
    """Rows with correlated channels (one fixed mixing per ``k``) and one ``outlier``x channel,
    like transformer activations; ``rng`` draws only the rows."""
    mix = np.random.default_rng(k).normal(size=(k, k)) / np.sqrt(k) + 0.3 * np.eye(k)
    x = rng.normal(size=(rows, k)) @ mix
    x[:, 5] *= outlier
    return x


def output_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    y = x @ w
    return float(((x @ w_hat - y) ** 2).sum() / (y ** 2).sum())


@pytest.mark.parametrize("precision", list(Precision))
def test_gptq_cuts_output_error_on_held_out_rows(precision):
    rng = np.random.default_rng(0)
    k, n = 96, 64
    calib, test = correlated_rows(rng, 2000, k), correlated_rows(rng, 2000, k)
    w = rng.normal(0, 0.05, (k, n))
    fmt = FORMATS[precision]
    scale = per_channel_weight_scale(w, 1, fmt.qmax).astype(np.float64)
    nearest = fmt.cast(w / scale).astype(np.float64)
    rounded = gptq_round(w, calib.T @ calib, scale, lambda v: fmt.cast(v).astype(np.float64), block=32)
    # on the grid: the stored type holds every value exactly
    assert np.array_equal(fmt.cast(rounded).astype(np.float64), rounded)
    assert np.abs(rounded).max() <= fmt.qmax
    before, after = output_error(test, w, nearest * scale), output_error(test, w, rounded * scale)
    assert after < 0.5 * before, (before, after)


def test_gptq_dead_inputs_round_to_nearest_and_shapes_are_checked():
    rng = np.random.default_rng(1)
    x = correlated_rows(rng, 500, 16)
    x[:, 3] = 0.0  # never active
    w = rng.normal(0, 0.05, (16, 8))
    scale = per_channel_weight_scale(w, 1).astype(np.float64)
    fmt = FORMATS[Precision.INT8]
    rounded = gptq_round(w, x.T @ x, scale, lambda v: fmt.cast(v).astype(np.float64))
    assert np.all(np.isfinite(rounded))
    assert np.array_equal(rounded[3], np.round(w[3] / scale))
    # an indefinite H (negative eigenvalue beyond the first damping) is damped harder, not fatal
    indefinite = x.T @ x - 0.05 * np.trace(x.T @ x) / 16 * np.eye(16)
    assert np.all(np.isfinite(gptq_round(w, indefinite, scale, lambda v: fmt.cast(v).astype(np.float64))))
    with pytest.raises(ValueError, match=r"hessian must be \[16, 16\]"):
        gptq_round(w, np.eye(8), scale, np.round)
    with pytest.raises(ValueError, match=r"scale must be \[8\]"):
        gptq_round(w, np.eye(16), scale[:4], np.round)


@pytest.mark.parametrize("k", [7, 300])
def test_inverse_cholesky_upper(k):
    """``UᵀU = (H + λI)⁻¹`` with ``U`` upper triangular (300: the inverse by halves recurses)."""
    x = correlated_rows(np.random.default_rng(1), 2 * k, k)
    h = x.T @ x
    u = inverse_cholesky_upper(h)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    assert np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(k), atol=1e-8)


def two_layer_model(tmp_path, seed=0):
    """x -> MatMul(w1) -> Relu -> Gemm(transB, w2): a MatMul and a transposed Gemm weight, each
    with one input row 10x the rest (a coarse weight grid: weight rounding dominates the error)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (32, 48)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (24, 48)).astype(np.float32)  # [N, K]
    w1[7] *= 10
    w2[:, 7] *= 10
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    def feeds(s):
        return {"x": correlated_rows(np.random.default_rng(s), 256, 32, outlier=1.0).astype(np.float32)}
    return path, feeds


def test_grams_match_numpy(tmp_path):
    path, feeds = two_layer_model(tmp_path)
    batches = [feeds(1), feeds(2)]
    loaded = load_model(path)
    grams = collect_grams(loaded, loaded.proto, {"x": 32, "r": 48}, CalibrationData(batches, 1), progress=False)
    w1 = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    r = np.maximum(x @ w1, 0)
    for tensor, rows in (("x", x), ("r", r)):
        expected = rows.T @ rows  # ORT sums in float32: compare against the largest entry
        np.testing.assert_allclose(grams[tensor], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert onnx.load(str(path)).graph.output[0].name == "y"  # the model file is untouched


def test_calibration_pass_measures_grams_beside_the_ranges(tmp_path):
    path, feeds = two_layer_model(tmp_path)
    data = CalibrationData([feeds(1), feeds(2)], 1)
    loaded = load_model(path)
    alone = collect_grams(loaded, loaded.proto, {"x": 32, "r": 48}, data, progress=False)
    both = calibrate(loaded, [StatTarget("r", -1, 48)], data, grams={"x": 32, "r": 48}, progress=False)
    r = np.maximum(np.concatenate([b["x"] for b in (feeds(1), feeds(2))]) @ onnx.numpy_helper.to_array(
        loaded.proto.graph.initializer[0]), 0)
    np.testing.assert_allclose(both.stats.amax["r"], np.abs(r).max(axis=0), rtol=1e-6)
    assert all(np.array_equal(both.grams[t], alone[t]) for t in alone) and both.stats.num_samples == 512


def test_smoothed_grams_give_the_weights_a_pass_on_the_smoothed_model_gives(demo_dir, tmp_path, monkeypatch):
    """GPTQ's H from the calibration pass's FP second moments, rescaled by the smoothing, against H
    measured on the smoothed graph (budget 0: every weight in a pass of its own): norm folds, a
    linear-output fold and split groups of the demo LLaMA, per tensor and per token."""
    model, calib = demo_dir / "tiny_llama.onnx", demo_dir / "tiny_llama.calib.npz"
    for granularity in Granularity:
        codes = {}
        for budget in (None, 0):
            if budget is not None:
                monkeypatch.setattr("passes.hessians.GRAM_BUDGET_BYTES", budget)
            out = tmp_path / f"{granularity.value}{budget}.onnx"
            result = run_smoothquant(model, out, calib=calib, config=SmoothQuantConfig(
                SmoothingConfig(0.8), QUIET, QuantizationConfig(granularity=granularity,
                                                                weight_rounding=WeightRounding.GPTQ)))
            assert any("extra pass" in m for m in result.messages) == (budget == 0)
            codes[budget] = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                             if t.data_type == TensorProto.INT8}
            monkeypatch.undo()
        assert codes[None].keys() == codes[0].keys() and len(codes[0]) >= 10
        same = [np.mean(codes[None][w] == codes[0][w]) for w in codes[0]]
        assert min(same) > 0.99, same  # float32 sums in another order can flip a rare tie


def test_weight_hessians_in_chunks_under_a_budget(tmp_path):
    """Asked in order, a budget of one input per pass measures each weight in its own pass; the
    sums equal the one-pass ones, and edits to the graph after construction are not seen."""
    path, feeds = two_layer_model(tmp_path)
    data = CalibrationData([feeds(1), feeds(2)], 1)
    loaded = load_model(path)
    inputs = {"w1": [("x", 32)], "w2": [("r", 48)]}
    whole = WeightHessians(loaded, loaded.proto, inputs, data, progress=False)
    small = WeightHessians(loaded, loaded.proto, inputs, data, budget=1, progress=False)
    del loaded.proto.graph.node[:]  # the snapshot keeps the graph it was given
    assert [small[w].shape for w in ("w1", "w2")] == [(32, 32), (48, 48)] and small.passes == 2
    assert all(np.array_equal(whole[w], small[w]) for w in inputs) and whole.passes == 1
    assert small.get("other") is None and len(small) == 2


@pytest.mark.parametrize("granularity, target", [(Granularity.PER_TENSOR, Target.TENSORRT),
                                                 (Granularity.PER_TENSOR, Target.ONNXRUNTIME),
                                                 (Granularity.PER_TOKEN, Target.ONNXRUNTIME)])
def test_pipeline_gptq_lowers_output_error(tmp_path, granularity, target):
    path, feeds = two_layer_model(tmp_path)
    calib = [feeds(s) for s in range(4)]
    test = feeds(99)
    ref = run(path, test)[0].astype(np.float64)
    errors = {}
    for rounding in WeightRounding:
        out = tmp_path / f"{rounding.value}.onnx"
        config = SmoothQuantConfig(SmoothingConfig(enabled=False), QUIET, QuantizationConfig(
            target=target, granularity=granularity, weight_rounding=rounding))
        result = run_smoothquant(path, out, calib=calib, config=config)
        assert len(result.quant_report.quantized) == 2
        got = run(out, test)[0]
        errors[rounding] = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
    assert errors[WeightRounding.GPTQ] < 0.8 * errors[WeightRounding.NEAREST], errors


def test_gptq_on_real_demo_model_and_its_limits(demo_dir, tmp_path):
    model = demo_dir / "tiny_llama.onnx"
    ev = held_out(demo_dir, "tiny_llama")
    ref = run(model, ev)[0]
    errors = {}
    for rounding in WeightRounding:
        out = tmp_path / f"{rounding.value}.onnx"
        run_smoothquant(model, out, calib=demo_dir / "tiny_llama.calib.npz", config=SmoothQuantConfig(
            SmoothingConfig(0.5), QUIET, QuantizationConfig(precision=Precision.FP8, weight_rounding=rounding)))
        errors[rounding] = float(np.abs(run(out, ev)[0] - ref).mean())
    assert errors[WeightRounding.GPTQ] < errors[WeightRounding.NEAREST], errors
    with pytest.raises(SmoothQuantError, match="needs --weights quantized"):
        QuantizationConfig(weight_rounding=WeightRounding.GPTQ, weights=WeightStorage.FLOAT)
    with pytest.raises(SmoothQuantError, match="read the calibration data more than once"):
        run_smoothquant(model, tmp_path / "x.onnx", calib=iter([ev]), config=SmoothQuantConfig(
            quantization=QuantizationConfig(weight_rounding=WeightRounding.GPTQ)))
    assert not (tmp_path / "x.onnx").exists()
