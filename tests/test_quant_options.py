"""Quantization options: --exclude, the sensitivity fallback, --target onnxruntime, --weights float."""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from passes import SmoothQuantConfig
from passes.check_trt import check_model
from passes.config import (CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, Target, Unfoldable,
                           WeightRounding, WeightStorage)
from passes.ir.errors import SmoothQuantError
from passes.patterns import FoldKind
from passes.pipeline import run_smoothquant
from passes.qdq import ActivationRange, per_channel_weight_scale
from test_quantize import held_out, row_cosine

QUIET = CalibrationConfig(progress=False)
NEAREST = QuantizationConfig(weight_rounding=WeightRounding.NEAREST)


def config(smoothing: SmoothingConfig = SmoothingConfig(0.5), **quant) -> SmoothQuantConfig:
    """One α and nearest rounding unless asked: these tests are about the other options."""
    quant.setdefault("weight_rounding", WeightRounding.NEAREST)
    return SmoothQuantConfig(smoothing, QUIET, QuantizationConfig(**quant))


def three_matmuls(tmp_path, seed=0):
    """Three independent MatMuls on graph inputs; ``x_b`` has one channel 300x the rest, which
    the weight all but ignores (so it sets the quantization step but not the output)."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(0, 0.1, (16, 8)).astype(np.float32) for k in "abc"}
    weights["b"][3] *= 1e-3
    nodes = [helper.make_node("MatMul", [f"x_{k}", f"w_{k}"], [f"y_{k}"], name=f"mm_{k}") for k in "abc"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(f"x_{k}", TensorProto.FLOAT, ["n", 16]) for k in "abc"],
        [helper.make_tensor_value_info(f"y_{k}", TensorProto.FLOAT, ["n", 8]) for k in "abc"],
        [numpy_helper.from_array(w, f"w_{k}") for k, w in weights.items()])
    path = tmp_path / "three.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {f"x_{k}": rng.normal(0, 1, (64, 16)).astype(np.float32) for k in "abc"}
    feeds["x_b"][:, 3] *= 300
    return path, weights, feeds


def fake_quant_error(x: np.ndarray, w: np.ndarray) -> float:
    """Mean over tokens of the relative squared output error of symmetric INT8 W8A8 (per-tensor x,
    per-column w), in NumPy."""
    a = np.abs(x).max() / 127
    xq = np.clip(np.round(x / a), -127, 127) * a
    ws = per_channel_weight_scale(w, 1)
    wq = np.clip(np.round(w / ws), -127, 127) * ws
    y = x.astype(np.float64) @ w
    return float((((xq @ wq - y) ** 2).sum(1) / (y ** 2).sum(1)).mean())


def test_layer_errors_match_numpy_and_fallback_keeps_the_outlier_layer(tmp_path):
    path, weights, feeds = three_matmuls(tmp_path)
    result = run_smoothquant(path, tmp_path / "q.onnx", calib=[feeds], config=config(max_fp_layers=2))
    measured = {e.name: e.relative for e in result.layer_errors}
    for k in "abc":
        np.testing.assert_allclose(measured[f"mm_{k}"], fake_quant_error(feeds[f"x_{k}"], weights[k]),
                                   rtol=2e-3)
    assert measured["mm_b"] > 20 * max(measured["mm_a"], measured["mm_c"]), measured
    kept = dict(result.quant_report.skipped)
    assert list(kept) == ["mm_b"] and "sensitivity fallback: SQNR" in kept["mm_b"]  # only one is far above
    assert sorted(result.quant_report.quantized) == ["mm_a", "mm_c"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    mm_b = next(n for n in model.graph.node if n.name == "mm_b")
    assert list(mm_b.input) == ["x_b", "w_b"]
    ref, got = run(path, feeds), run(tmp_path / "q.onnx", feeds)
    np.testing.assert_array_equal(ref[1], got[1])


def test_fallback_needs_data_it_can_read_twice(tmp_path):
    path, _, feeds = three_matmuls(tmp_path)
    with pytest.raises(SmoothQuantError, match="more than once"):
        run_smoothquant(path, tmp_path / "q.onnx", calib=iter([feeds]), config=config(max_fp_layers=1))
    assert not (tmp_path / "q.onnx").exists()


def test_exclude_keeps_matching_ops_fp(tmp_path):
    path, _, feeds = three_matmuls(tmp_path)
    result = run_smoothquant(path, tmp_path / "q.onnx", calib=[feeds], config=config(exclude=("_[ab]$", "nomatch")))
    assert result.quant_report.quantized == ["mm_c"]
    assert dict(result.quant_report.skipped) == {"mm_a": "excluded by --exclude '_[ab]$'",
                                                 "mm_b": "excluded by --exclude '_[ab]$'"}
    assert any("'nomatch' matches no linear op" in m for m in result.messages)
    with pytest.raises(SmoothQuantError, match="not a regular expression"):
        QuantizationConfig(exclude=("(",))


def test_exclude_op_types_keeps_every_op_of_a_type_fp(demo_dir, tmp_path):
    """ModelOpt's op_types_to_exclude: with MatMul excluded the demo LLaMA (MatMuls only) stays all FP; a
    string is a comma-separated list (API), an unknown type is refused by name."""
    model = demo_dir / "tiny_llama.onnx"
    result = run_smoothquant(model, tmp_path / "q.onnx", calib=demo_dir / "tiny_llama.calib.npz",
                             config=config(exclude_op_types="Gemm, MatMul"))
    assert not result.quant_report.quantized and len(result.quant_report.skipped) == 15
    assert {why for _, why in result.quant_report.skipped} == {"excluded by --exclude-op-types MatMul"}
    assert QuantizationConfig(exclude="lm_head").exclude == ("lm_head",)
    with pytest.raises(SmoothQuantError, match="--exclude-op-types matmul: this tool quantizes MatMul, Gemm, Conv"):
        QuantizationConfig(exclude_op_types=("matmul",))


def fused_op_types(path, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_onnxruntime_target_fuses_every_matmul(demo_dir, tmp_path):
    path = demo_dir / "tiny_bert.onnx"
    ours = run_smoothquant(path, tmp_path / "ort.onnx", config=config(target=Target.ONNXRUNTIME))
    trt = run_smoothquant(path, tmp_path / "trt.onnx", config=config())
    n = len(ours.quant_report.quantized)
    assert n == 12
    model = onnx.load(str(tmp_path / "ort.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].dtype == np.uint8 and inits[q.input[1]].shape == ()
    # every quantized MatMul is lowered to ORT's integer GEMM with its bias add fused
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == n and all(g.domain == "com.microsoft" and len(g.input) == 7 for g in gemms)
    assert all(inits[g.input[1]].dtype == np.int8 and inits[g.input[4]].dtype == np.uint8 for g in gemms)
    assert not any(n.op_type in ("DequantizeLinear", "MatMul") and n.input[0] in inits for n in model.graph.node)
    assert "onnxruntime lowering: 12 MatMuls" in "\n".join(ours.messages)
    # ORT keeps them all as integer GEMMs; the symmetric int8 (TensorRT) placement gets only
    # some of its MatMuls fused.
    fused = fused_op_types(tmp_path / "ort.onnx", tmp_path)
    assert fused["MatMulIntegerToFloat"] == n, fused
    assert fused_op_types(tmp_path / "trt.onnx", tmp_path)["MatMulIntegerToFloat"] < n == len(trt.quant_report.quantized)
    feeds = held_out(demo_dir, "tiny_bert")
    cos = row_cosine(run(path, feeds)[0], run(tmp_path / "ort.onnx", feeds)[0])
    assert cos.mean() > 0.9995, cos.mean()


def test_onnxruntime_target_keeps_gelu_scalars_for_fusion(tmp_path):
    """GELU as BERT exports it: ``Mul(Mul(h, Add(Erf(Div(h, sqrt2)), 1)), 0.5)``. Folding 1/s into
    its 0.5 turns the scalar into a vector and ORT no longer fuses GELU; for the onnxruntime target
    the group is split (the default; here no channel is an outlier, so it stays unsmoothed) or, with
    ``--unfoldable mul``, gets an explicit Mul; either way ORT runs one Gelu kernel."""
    rng = np.random.default_rng(4)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 16] y) {
            h0 = MatMul (x, w1)
            h = Add (b1, h0)
            d = Div (h, sqrt2)
            e = Erf (d)
            e1 = Add (e, one)
            m = Mul (h, e1)
            g = Mul (m, half)
            y = MatMul (g, w2)
        }""")
    inits = {"w1": rng.standard_normal((16, 32)), "b1": rng.standard_normal(32), "w2": rng.standard_normal((32, 16)),
             "sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5)}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    onnx.save(model, str(tmp_path / "gelu.onnx"))
    np.savez(tmp_path / "gelu.calib.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    mul = SmoothingConfig(unfoldable=Unfoldable.MUL)
    results = {t: run_smoothquant(tmp_path / "gelu.onnx", tmp_path / f"{t.value}.onnx",
                                  config=replace(config(target=t), smoothing=mul)) for t in Target}
    kinds = {t: [g.kind for g in r.report.groups if g.activation == "g"] for t, r in results.items()}
    assert kinds == {Target.ONNXRUNTIME: [FoldKind.MUL], Target.TENSORRT: [FoldKind.NORM]}
    default = run_smoothquant(tmp_path / "gelu.onnx", tmp_path / "default.onnx", config=config(target=Target.ONNXRUNTIME))
    group = next(g for g in default.report.groups if g.activation == "g")
    assert group.kind is None and "no channel's max|X| exceeds 2x" in group.detail
    assert fused_op_types(tmp_path / "default.onnx", tmp_path)["Gelu"] == 1
    out = onnx.load(str(tmp_path / "onnxruntime.onnx"))
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "half")).shape == ()
    fused = fused_op_types(tmp_path / "onnxruntime.onnx", tmp_path)
    assert fused["Erf"] == 0 and fused["Gelu"] + fused["BiasGelu"] == 1, fused
    assert fused_op_types(tmp_path / "tensorrt.onnx", tmp_path)["Erf"] == 1
    x = rng.standard_normal((8, 16)).astype(np.float32)
    ref = run(tmp_path / "gelu.onnx", {"x": x})[0]
    assert row_cosine(ref, run(tmp_path / "onnxruntime.onnx", {"x": x})[0]).min() > 0.99


def test_asymmetric_range_uses_signed_statistics():
    rng = ActivationRange(-0.17, 10.0)  # a GELU output
    scale, zero = rng.uint8_params()
    assert zero == round(0.17 / scale) and scale == pytest.approx(10.17 / 255)
    assert ActivationRange(0.5, 2.0).uint8_params() == (pytest.approx(2.0 / 255), 0)  # widened to hold 0


def mlp(tmp_path, d=256, hidden=1024, dtype=np.float32):
    """LayerNorm -> MatMul -> Relu -> MatMul: nearly all bytes are linear weights."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.ones(d, dtype), "gamma"),
             numpy_helper.from_array(np.zeros(d, dtype), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.05, (d, hidden)).astype(dtype), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.05, (hidden, d)).astype(dtype), "w2")]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["u"], name="fc1"),
             helper.make_node("Relu", ["u"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["b", d])],
                              [helper.make_tensor_value_info("y", elem, ["b", d])], inits)
    path = tmp_path / f"mlp_{np.dtype(dtype).name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(0, 1, (32, d)).astype(np.float32)
    x[:, 5] *= 50
    return path, {"x": x.astype(dtype)}


@pytest.mark.parametrize("precision, rounding", [(p, WeightRounding.NEAREST) for p in Precision]
                         + [(Precision.FP8, WeightRounding.GPTQ)])
def test_fp16_models_quantize_with_fp16_scales(tmp_path, precision, rounding):
    """QuantizeLinear takes fp16 input from opset 19: the model is converted, scales match its type
    (GPTQ: its second moments are measured in float32 from the fp16 activations)."""
    path16, feeds16 = mlp(tmp_path, dtype=np.float16)
    path32, feeds32 = mlp(tmp_path)
    result = run_smoothquant(path16, tmp_path / "q16.onnx", calib=[feeds16],
                             config=config(precision=precision, weight_rounding=rounding))
    assert any("to 19" in m for m in result.messages) and len(result.quant_report.quantized) == 2
    model = onnx.load(str(tmp_path / "q16.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    assert check_model(tmp_path / "q16.onnx").ok
    q32 = run_smoothquant(path32, tmp_path / "q32.onnx", calib=[feeds32],
                          config=config(precision=precision, weight_rounding=rounding))
    y16, y32 = run(tmp_path / "q16.onnx", feeds16)[0].astype(np.float64), run(q32.written[0], feeds32)[0]
    ref = run(path32, feeds32)[0]
    cos = lambda a, b: float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(y16, ref) > cos(y32, ref) - 2e-3, (cos(y16, ref), cos(y32, ref))


def test_weight_storage_file_size_and_equivalence(tmp_path):
    path, feeds = mlp(tmp_path)
    stored = run_smoothquant(path, tmp_path / "int8.onnx", calib=[feeds],
                             config=config(weights=WeightStorage.QUANTIZED)).written[0]
    floats = run_smoothquant(path, tmp_path / "float.onnx", calib=[feeds],
                             config=config(weights=WeightStorage.FLOAT)).written[0]
    ratio = path.stat().st_size / stored.stat().st_size
    assert 3.5 < ratio <= 4.0, ratio  # measured 3.97
    assert floats.stat().st_size > 0.95 * path.stat().st_size
    float_model = onnx.load(str(floats))
    weight_q = [n for n in float_model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("w1", "w2")]
    assert len(weight_q) == 2 and all(next(a.i for a in n.attribute if a.name == "axis") == 1 for n in weight_q)
    assert sum(n.op_type == "QuantizeLinear" for n in float_model.graph.node) == 4  # 2 activations + 2 weights
    # Both storages compute the same thing (Q of the FP weight at run time == the stored int8).
    np.testing.assert_allclose(run(stored, feeds)[0], run(floats, feeds)[0], rtol=1e-5, atol=1e-5)


def test_cli_options(demo_dir, tmp_path, capsys):
    from passes.smoothquant import main

    out = tmp_path / "q.onnx"
    assert main([str(demo_dir / "tiny_llama.onnx"), "-o", str(out), "--max-fp-layers", "1",
                 "--exclude", "linear_1$", "--target", "onnxruntime", "--weights", "float"]) == 0
    text = capsys.readouterr().out
    assert "lowest per-layer SQNR" in text and "13 linear ops quantized (INT8 W8A8, weights rounded to nearest), 2 kept in FP" in text
    assert main([str(demo_dir / "tiny_llama.onnx"), "-o", str(tmp_path / "x.onnx"), "--exclude", "("]) == 1
    assert "not a regular expression" in capsys.readouterr().err
    assert main([str(demo_dir / "tiny_llama.onnx"), "-o", str(tmp_path / "x.onnx"), "--precision", "fp8",
                 "--target", "onnxruntime"]) == 1
    assert main([str(demo_dir / "tiny_llama.onnx"), "-o", str(tmp_path / "x.onnx"), "--weight-rounding", "gptq",
                 "--weights", "float"]) == 1
    assert "needs --weights quantized" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert main([str(demo_dir / "tiny_llama.onnx"), "-o", str(out), "--weight-rounding", "gptq"]) == 0
    assert "15 linear ops quantized" in capsys.readouterr().out


def test_alpha_search_picks_the_lowest_error_per_group(tmp_path):
    path, feeds = mlp(tmp_path)
    cfg = SmoothQuantConfig(SmoothingConfig(alpha_grid=(0.2, 0.5, 0.9)), QUIET, NEAREST)
    result = run_smoothquant(path, tmp_path / "auto.onnx", calib=[feeds], config=cfg)
    # LayerNorm -> fc1 gets the α grid (and the split, for its 50x channel); Relu -> fc2 has no constant to
    # fold into: it is measured only if it has outlier channels to split
    assert {c.activation for c in result.alpha_choices} <= {"h", "r"}
    for choice in result.alpha_choices:
        assert {None, 0.2, 0.5, 0.9} <= set(choice.errors) if choice.activation == "h" else 0.5 not in choice.errors
        assert choice.errors[choice.alpha] == min(choice.errors.values())
    ln = next(c for c in result.alpha_choices if c.activation == "h")
    assert ln.alpha is not None and ln.errors[ln.alpha] < 0.5 * ln.errors[None]  # the 50x channel needs smoothing
    # The searched model is no worse than any single alpha of the grid on the calibration data.
    y = run(path, feeds)[0]

    def error(model):
        return float(((run(model, feeds)[0] - y) ** 2).sum() / (y ** 2).sum())

    searched = error(tmp_path / "auto.onnx")
    for alpha in (0.2, 0.5, 0.9):
        fixed = run_smoothquant(path, tmp_path / f"a{alpha}.onnx", calib=[feeds],
                                config=SmoothQuantConfig(SmoothingConfig(alpha), QUIET, NEAREST))
        assert searched <= error(fixed.written[0]) * 1.05, (alpha, searched)
    # Smoothing with searched scales stays exact.
    smooth = run_smoothquant(path, tmp_path / "s.onnx", calib=[feeds],
                             config=SmoothQuantConfig(SmoothingConfig(alpha_grid=(0.2, 0.5, 0.9)), QUIET, None))
    assert smooth.report.smoothed
    np.testing.assert_allclose(run(tmp_path / "s.onnx", feeds)[0], y, rtol=1e-4, atol=1e-5 * np.abs(y).max())


def test_no_smoothing_baseline(tmp_path):
    path, feeds = mlp(tmp_path)
    cfg = SmoothQuantConfig(SmoothingConfig(enabled=False), QUIET, NEAREST)
    result = run_smoothquant(path, tmp_path / "q.onnx", calib=[feeds], config=cfg)
    assert not result.report.smoothed and all(g.detail == "smoothing disabled" for g in result.report.groups)
    assert len(result.quant_report.quantized) == 2
    weights = {t.name for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert "gamma" in weights  # untouched


def test_clip_search_ignores_a_single_token_outlier(tmp_path):
    """One token 300x larger sets max calibration's step; the search clips it and the error drops."""
    path, weights, feeds = three_matmuls(tmp_path)
    feeds = {k: v.copy() for k, v in feeds.items()}
    feeds["x_b"] = np.random.default_rng(5).normal(0, 1, (64, 16)).astype(np.float32)
    feeds["x_b"][7] *= 300  # one token, every channel (smoothing cannot help: it is per channel)
    searched = run_smoothquant(path, tmp_path / "clip.onnx", calib=[feeds],
                               config=config(clip_grid=(1.0, 0.5, 0.1, 0.02), max_fp_layers=1))
    choice = {c.activation: c for c in searched.clip_choices}
    assert choice["x_b"].ratio < 1.0 and choice["x_b"].errors[choice["x_b"].ratio] < 0.5 * choice["x_b"].errors[1.0]
    assert all(c.errors[c.ratio] == min(c.errors.values()) for c in searched.clip_choices)
    plain = run_smoothquant(path, tmp_path / "max.onnx", calib=[feeds], config=config(max_fp_layers=1))
    # The per-layer errors after quantization (measured by the fallback pass) agree with the search.
    err = {e.name: e.relative for e in searched.layer_errors}, {e.name: e.relative for e in plain.layer_errors}
    assert err[0]["mm_b"] < 0.5 * err[1]["mm_b"]
    np.testing.assert_allclose(err[0]["mm_b"], choice["x_b"].errors[choice["x_b"].ratio], rtol=1e-3)
    with pytest.raises(SmoothQuantError, match="clipping ratios"):
        QuantizationConfig(clip_grid=(0.0,))
