"""INT8 Q/DQ placement: structure, scales after smoothing, accuracy against FP on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import run
from passes import SmoothingConfig, SmoothQuantConfig, run_smoothquant
from passes.config import QuantizationConfig, WeightRounding


def quantize(path, out, alpha=0.5, **kw):
    """One α, nearest rounding: the Q/DQ placement these tests check, not the default's search."""
    return run_smoothquant(path, out, config=SmoothQuantConfig(
        SmoothingConfig(alpha=alpha), quantization=QuantizationConfig(weight_rounding=WeightRounding.NEAREST)), **kw)


def row_cosine(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, ref.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def held_out(demo_dir, name):
    return dict(np.load(demo_dir / f"{name}.eval.npz"))


@pytest.mark.parametrize("name, n_linear", [("tiny_llama", 15), ("tiny_bert", 12)])
def test_structure(demo_dir, tmp_path, name, n_linear):
    result = quantize(demo_dir / f"{name}.onnx", tmp_path / "q.onnx")
    assert len(result.quant_report.quantized) == n_linear and not result.quant_report.skipped
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in producer]
    quantized = [n for n in linear if producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized) == n_linear
    for node in quantized:
        act_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert act_dq.op_type == "DequantizeLinear"
        act_q = producer[act_dq.input[0]]
        assert act_q.op_type == "QuantizeLinear"
        assert inits[act_dq.input[1]].shape == () and inits[act_dq.input[1]] > 0  # per-tensor scale
        assert inits[act_dq.input[2]].dtype == np.int8 and inits[act_dq.input[2]] == 0
        w_q, w_scale, w_zero = (inits[i] for i in w_dq.input)
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        assert axis == 1 and w_q.dtype == np.int8 and w_q.ndim == 2  # MatMul [K, N]: per output channel
        assert w_scale.shape == (w_q.shape[1],) and np.all(w_scale > 0)
        assert w_zero.dtype == np.int8 and not w_zero.any()
        assert np.abs(w_q.astype(np.int32)).max() <= 127
    outputs = {o.name for o in model.graph.output}
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] in outputs
                   for n in model.graph.node)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims and len(t.dims) == 2 and t.dims[0] >= 64
                   for t in model.graph.initializer if t.name in {n.input[1] for n in linear}), "FP weights left"


def test_activation_scale_is_smoothed_range(demo_dir, tmp_path):
    """max|X'| = max_j(amax_j / s_j): equal to the real range of the smoothed activation on the same data;
    for an activation quantized shifted (X' - c), ``max|X'| - |c|``, the grid covering the real range."""
    path = demo_dir / "tiny_llama.onnx"
    quantize(path, tmp_path / "q.onnx")
    run_smoothquant(path, tmp_path / "s.onnx", config=SmoothQuantConfig(SmoothingConfig(0.5), quantization=None))
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    shifted = {n.output[0]: (n.input[0], float(inits[n.input[1]])) for n in q.graph.node if n.op_type == "Sub"}
    act_scales = {shifted.get(n.input[0], (n.input[0],))[0]: (float(inits[n.input[1]]), n.input[0] in shifted)
                  for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits
                  and inits[n.input[1]].size == 1}
    smoothed = onnx.load(str(tmp_path / "s.onnx"))
    names = sorted(act_scales)
    smoothed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    calib = dict(np.load(demo_dir / "tiny_llama.calib.npz"))
    values = run(smoothed, calib)[-len(names):]
    assert any(s for _, s in act_scales.values())  # the demo has one-sided activations (after SiLU)
    for name, value in zip(names, values):
        scale, is_shifted = act_scales[name]
        c = next((v for x, v in shifted.values() if x == name), 0.0)
        np.testing.assert_allclose(scale * 127, np.abs(value).max() - abs(c), rtol=1e-5)
        assert c - 127 * scale <= value.min() + 1e-5 and c + 127 * scale >= value.max() - 1e-5


def test_smoothquant_beats_no_smoothing_on_outlier_model(demo_dir, tmp_path):
    path = demo_dir / "tiny_llama.onnx"
    feeds = held_out(demo_dir, "tiny_llama")
    ref = run(path, feeds)[0]
    scores = {}
    for alpha in (0.0, 0.5, 0.8):
        out = quantize(path, tmp_path / f"q{alpha}.onnx", alpha=alpha).written[0]
        got = run(out, feeds)[0]
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        scores[alpha] = (float(row_cosine(ref, got).mean()), top1)
    # measured: alpha 0 -> cos 0.68, top-1 0.42; 0.5 -> 0.90, 0.74; 0.8 -> 0.94, 0.82
    assert scores[0.5][0] > scores[0.0][0] + 0.15 and scores[0.5][1] > scores[0.0][1] + 0.2, scores
    assert scores[0.8][0] > 0.93 and scores[0.8][1] > 0.78, scores


def test_encoder_int8_close_to_fp(demo_dir, tmp_path):
    path = demo_dir / "tiny_bert.onnx"
    feeds = held_out(demo_dir, "tiny_bert")
    got = run(quantize(path, tmp_path / "q.onnx").written[0], feeds)[0]
    cos = row_cosine(run(path, feeds)[0], got)
    assert cos.mean() > 0.999, cos.mean()


def test_deterministic_bytes(demo_dir, tmp_path):
    a = quantize(demo_dir / "tiny_llama.onnx", tmp_path / "a.onnx").written[0]
    b = quantize(demo_dir / "tiny_llama.onnx", tmp_path / "b.onnx").written[0]
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bert_legacy"])
def test_fp8_structure_and_opset_conversion(demo_dir, tmp_path, name):
    from passes import CalibrationConfig, Precision, QuantizationConfig

    config = SmoothQuantConfig(calibration=CalibrationConfig(progress=False),
                               quantization=QuantizationConfig(Precision.FP8))
    calib = demo_dir / f"{name}.calib.npz"
    result = run_smoothquant(demo_dir / f"{name}.onnx", tmp_path / "f.onnx", calib=calib, config=config)
    assert any("to 19 for FP8" in m for m in result.messages)
    model = onnx.load(str(tmp_path / "f.onnx"))
    assert model.opset_import[0].version == 19
    f8 = onnx.TensorProto.FLOAT8E4M3FN
    by_name = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(by_name[n.input[2]].data_type == f8 for n in qdq)  # zero points
    weights = [by_name[n.input[0]] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in by_name]
    assert len(weights) == len(result.quant_report.quantized) and all(w.data_type == f8 for w in weights)
    feeds = held_out(demo_dir, name.removesuffix("_legacy"))
    cos = row_cosine(run(demo_dir / f"{name}.onnx", feeds)[0], run(tmp_path / "f.onnx", feeds)[0])
    # measured: tiny_llama 0.936, tiny_bert 0.9999
    assert cos.mean() > (0.93 if name == "tiny_llama" else 0.9995), cos.mean()


def test_layer_sqnr_skips_outputs_smoothing_rescaled(demo_dir, tmp_path):
    """The up projection absorbs 1/s of the SwiGLU group: its output differs on purpose, so the
    model's metadata lists it and evaluate's per-layer SQNR leaves it out."""
    import json

    from passes.evaluate import layer_sqnr
    from passes.pipeline import RESCALED_OUTPUTS_KEY

    path = demo_dir / "tiny_llama.onnx"
    result = quantize(path, tmp_path / "q.onnx", alpha=0.8)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    rescaled = json.loads(meta[RESCALED_OUTPUTS_KEY])
    assert len(rescaled) == 2 == result.report.count(__import__("passes.patterns").patterns.FoldKind.LINEAR)
    feed = {k: v[:1] for k, v in held_out(demo_dir, "tiny_llama").items()}
    rows = layer_sqnr(path, tmp_path / "q.onnx", feed)
    assert {name for name, _ in rows}.isdisjoint(rescaled) and len(rows) == 17
    assert all(5 < db < 60 for _, db in rows), rows  # measured 9.9 .. 40 dB


def test_one_sided_activations_are_quantized_shifted(tmp_path):
    """An input in [0, hi] (as after ReLU or GELU): symmetric INT8 wastes half its codes on negatives.
    For TensorRT (zero points 0) the default quantizes X - c (c the middle) and adds c Σ_k W_dq back
    after the GEMM: the same function in FP, half the step, a lower error than without the shift; a
    symmetric input is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from passes.config import QuantizationConfig, WeightRounding
    from test_quant_options import QUIET

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.3, (16, 8)).astype(np.float32), rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["u", "w1"], ["y"], name="fc_u"),
                               helper.make_node("MatMul", ["v", "w2"], ["z"], name="fc_v")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in "uv"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 8]) for n in "yz"],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "m.onnx"))

    def feed(n):  # u one-sided, v symmetric
        return {"u": rng.uniform(0, 4, (n, 16)).astype(np.float32), "v": rng.normal(size=(n, 16)).astype(np.float32)}

    calib, feeds = [feed(64), feed(64)], feed(512)
    ref = run(tmp_path / "m.onnx", feeds)
    errors = {}
    for shift in (True, False):
        cfg = SmoothQuantConfig(SmoothingConfig(enabled=False), QUIET,
                                QuantizationConfig(weight_rounding=WeightRounding.NEAREST, activation_shift=shift))
        run_smoothquant(tmp_path / "m.onnx", tmp_path / f"q{shift}.onnx", calib=calib, config=cfg)
        model = onnx.load(str(tmp_path / f"q{shift}.onnx"))
        assert [n.input[0] for n in model.graph.node if n.op_type == "Sub"] == (["u"] if shift else [])
        got = run(model, feeds)
        errors[shift] = [float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref)]
    assert errors[True][0] < 0.85 * errors[False][0], errors  # half the activation step (the weight error stays)
    assert errors[True][1] == errors[False][1]  # symmetric: untouched


def test_shift_keeps_slack_on_the_short_side():
    """The shifted grid reaches twice the short side's calibrated extreme: after GELU (bounded
    below by -0.17) that costs nothing; a range whose short side held-out data outruns (SmolLM2's
    norm outputs: calibrated [-2.47, 7.32], held-out down to -4.59) stays unshifted."""
    from passes.qdq import ActivationRange

    gelu = ActivationRange(-0.17, 10.0)
    assert gelu.shift() == pytest.approx((10.0 - 0.34) / 2) and 10.0 - gelu.shift() < 0.52 * 10.0
    assert ActivationRange(-2.47, 7.32).shift() == 0.0 and ActivationRange(-1.0, 1.2).shift() == 0.0
    assert ActivationRange(-10.0, 0.1).shift() == pytest.approx((-10.0 + 0.2) / 2)  # mirrored
    assert ActivationRange(-2.47, 7.32).shift(slack=1.0) == pytest.approx((7.32 - 2.47) / 2)  # no slack
    assert ActivationRange(0.5, 10.0).shift() == pytest.approx(5.0)  # outwards: the grid reaches 0, not 1
    assert ActivationRange(-2.47, 7.32, floored=True).shift() == pytest.approx((7.32 - 2.47) / 2)


def test_a_bound_every_channel_meets_is_a_floor():
    """GELU's -0.17 (met by every channel, whatever s) is a floor; norm outputs' spread minima are not."""
    from calibrators.stats import ChannelStats
    from passes.smooth import smoothed_range

    rng = np.random.default_rng(0)
    stats = ChannelStats()
    hi = rng.uniform(1, 20, 64).astype(np.float32)
    gelu_lo = np.full(64, -0.17, dtype=np.float32) + rng.uniform(0, 0.002, 64).astype(np.float32)
    stats.update("gelu", np.maximum(hi, -gelu_lo), -1, minimum=gelu_lo, maximum=hi)
    norm_lo = -rng.uniform(0.5, 3, 64).astype(np.float32)
    stats.update("norm", np.maximum(hi, -norm_lo), -1, minimum=norm_lo, maximum=hi)
    s = rng.uniform(0.5, 2, 64)
    assert smoothed_range(stats, "gelu", s).floored and not smoothed_range(stats, "norm", s).floored
    assert smoothed_range(stats, "gelu", s).scaled(0.9).floored
