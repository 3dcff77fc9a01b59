"""Smoothing without quantization is exact: every supported pattern, through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import initializer_arrays, rel_err, run, random_feeds, text_like_feeds
from passes import SmoothingConfig, SmoothQuantConfig, Unfoldable, run_smoothquant
from passes.patterns import FoldKind

TOL = 1e-5
SMOOTH_ONLY = SmoothQuantConfig(quantization=None)


def smooth(path, calib=None, alpha=0.5, unfoldable=Unfoldable.SKIP, output=None):
    config = SmoothQuantConfig(SmoothingConfig(alpha=alpha, unfoldable=unfoldable), quantization=None)
    return run_smoothquant(path, output, calib=calib, config=config)


def kinds(result) -> list:
    return [g.kind for g in result.report.groups]


def weights_changed(before, after) -> int:
    a, b = initializer_arrays(before), initializer_arrays(after)
    return sum(1 for k in a if k in b and a[k].shape == b[k].shape and not np.array_equal(a[k], b[k]))


# Demo models exported with torch ---------------------------------------------------------------


@pytest.mark.parametrize("name, norm, opset", [
    ("tiny_llama", "RMSNorm (decomposed)", 18),       # torch.onnx.export(dynamo=True)
    ("tiny_bert", "LayerNormalization", 17),          # LayerNormalization op
    ("tiny_bert_legacy", "LayerNorm (decomposed)", 14),  # TorchScript exporter
])
def test_demo_models_exact(demo_dir, name, norm, opset):
    path = demo_dir / f"{name}.onnx"
    assert onnx.load(str(path)).opset_import[0].version == opset
    result = smooth(path)
    out = result.written[0]
    assert any(g.detail == norm for g in result.report.smoothed), result.report.summary()
    assert weights_changed(path, out) >= 4
    base = name.removesuffix("_legacy")
    for feeds in (random_feeds(base, 100), text_like_feeds(base, 101), random_feeds(base, 102, 1, 5)):
        assert rel_err(run(path, feeds), run(out, feeds)) < TOL


def test_llama_groups_qkv_gate_up_and_swiglu(demo_dir):
    result = smooth(demo_dir / "tiny_llama.onnx")
    sizes = sorted(len(g.consumers) for g in result.report.smoothed if g.kind is FoldKind.NORM)
    # per layer: q/k/v share one scale, gate/up share one; plus lm_head after the final norm
    assert sizes == [1, 2, 2, 3, 3]
    swiglu = [g for g in result.report.smoothed if g.kind is FoldKind.LINEAR]
    assert len(swiglu) == 2 and all("SwiGLU" in g.detail for g in swiglu)
    # the planted ~100x down-projection outliers are what SwiGLU folding moves
    assert all(g.scale_range[1] > 50 for g in swiglu)


def test_post_ln_residual_is_compensated(demo_dir):
    result = smooth(demo_dir / "tiny_bert.onnx")
    norms = [g for g in result.report.smoothed if g.kind is FoldKind.NORM]
    assert len(norms) == 4 and all(any("compensating" in n for n in g.notes) for g in norms)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_any_alpha_is_exact(demo_dir, alpha):
    path = demo_dir / "tiny_llama.onnx"
    out = smooth(path, alpha=alpha, output=demo_dir / f"alpha{alpha}.onnx").written[0]
    feeds = text_like_feeds("tiny_llama", 7)
    assert rel_err(run(path, feeds), run(out, feeds)) < TOL


def test_unfoldable_mul_policy_is_exact_and_reported(demo_dir):
    path = demo_dir / "tiny_bert.onnx"
    result = smooth(path, unfoldable=Unfoldable.MUL, output=demo_dir / "bert_mul.onnx")
    assert kinds(result).count(FoldKind.MUL) == 4  # 2 GELU outputs and 2 attention outputs per model
    feeds = text_like_feeds("tiny_bert", 8)
    assert rel_err(run(path, feeds), run(result.written[0], feeds)) < TOL


# Small graphs written in a few lines -------------------------------------------------------------


def build(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    onnx.checker.check_model(model)
    return model


def outlier_feed(rng, shape, axis=-1, n=None):
    x = rng.standard_normal(shape).astype(np.float32)
    idx = [slice(None)] * len(shape)
    idx[axis] = slice(0, 2)
    x[tuple(idx)] *= 60.0  # two outlier channels
    return x


def check_graph(tmp_path, model, feed_name, shape, axis=-1, expect=None, **kw):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.calib.npz", **{feed_name: outlier_feed(rng, (16,) + shape, axis)})
    result = smooth(path, **kw)
    assert result.report.smoothed, result.report.summary()
    if expect is not None:
        assert kinds(result) == expect, result.report.summary()
    out = result.written[0]
    assert weights_changed(path, out) >= 1
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        feed = {feed_name: outlier_feed(rng, (5,) + shape, axis)}
        assert rel_err(run(path, feed), run(out, feed)) < TOL
    return result


def test_gemm_transb_after_layernorm(tmp_path):
    rng = np.random.default_rng(3)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 8] y) {
            h = LayerNormalization <axis = -1> (x, gamma, beta)
            y = Gemm <transB = 1, alpha = 0.5> (h, w, c)
        }""", gamma=rng.uniform(0.5, 2, 16), beta=rng.standard_normal(16), w=rng.standard_normal((8, 16)),
        c=rng.standard_normal(8))
    check_graph(tmp_path, model, "x", (16,), expect=[FoldKind.NORM])


def test_batchnorm_into_conv(tmp_path):
    rng = np.random.default_rng(4)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6, 8, 8] x) => (float[N, 4, 6, 6] y) {
            h = BatchNormalization (x, scale, bias, mean, var)
            y = Conv <kernel_shape = [3, 3]> (h, w, b)
        }""", scale=rng.uniform(0.5, 2, 6), bias=rng.standard_normal(6), mean=rng.standard_normal(6),
        var=rng.uniform(0.5, 2, 6), w=rng.standard_normal((4, 6, 3, 3)), b=rng.standard_normal(4))
    check_graph(tmp_path, model, "x", (6, 8, 8), axis=1, expect=[FoldKind.NORM])


def test_preceding_linear_with_bias(tmp_path):
    rng = np.random.default_rng(5)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, T, 8] x) => (float[N, T, 4] y) {
            a = MatMul (x, w1)
            h = Add (a, b1)
            y = MatMul (h, w2)
        }""", w1=rng.standard_normal((8, 12)) * np.r_[[30.0] * 2, [1.0] * 10], b1=rng.standard_normal(12),
        w2=rng.standard_normal((12, 4)))
    result = check_graph(tmp_path, model, "x", (3, 8), expect=[FoldKind.LINEAR, None])
    assert "graph input" in result.report.groups[1].detail


def test_weight_shared_by_two_groups_is_cloned(tmp_path):
    rng = np.random.default_rng(6)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y) {
            h1 = Mul (x, g1)
            h2 = Mul (x, g2)
            a = MatMul (h1, w)
            b = MatMul (h2, w)
            y = Add (a, b)
        }""", g1=rng.uniform(0.5, 2, 8), g2=rng.uniform(0.5, 2, 8) * np.r_[[20.0], [1.0] * 7],
        w=rng.standard_normal((8, 8)))
    result = check_graph(tmp_path, model, "x", (8,), expect=[FoldKind.NORM, FoldKind.NORM])
    assert any("cloned constant 'w'" in n for g in result.report.groups for n in g.notes)


def test_gamma_reached_through_identity_and_shared(tmp_path):
    rng = np.random.default_rng(7)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 4] y, float[N, 8] z) {
            gi = Identity (gamma)
            h = Mul (x, gi)
            y = MatMul (h, w)
            z = Mul (x, gamma)
        }""", gamma=rng.uniform(0.5, 2, 8), w=rng.standard_normal((8, 4)))
    result = check_graph(tmp_path, model, "x", (8,), expect=[FoldKind.NORM])
    assert any("cloned constant 'gamma'" in n for n in result.report.groups[0].notes)


def test_inserted_mul_when_nothing_absorbs(tmp_path):
    rng = np.random.default_rng(8)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 4] y) {
            h = Relu (x)
            y = MatMul (h, w)
        }""", w=rng.standard_normal((8, 4)))
    check_graph(tmp_path, model, "x", (8,), expect=[FoldKind.MUL], unfoldable=Unfoldable.MUL)


def test_scalar_gamma_becomes_per_channel(tmp_path):
    rng = np.random.default_rng(9)
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 4] y) {
            h = Mul (x, k)
            y = MatMul (h, w)
        }""", k=np.array(0.5), w=rng.standard_normal((8, 4)))
    check_graph(tmp_path, model, "x", (8,), expect=[FoldKind.NORM])


def test_fp16_model_is_close(tmp_path):
    rng = np.random.default_rng(10)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[N, 16] x) => (float16[N, 8] y) {
            h = LayerNormalization <axis = -1> (x, gamma, beta)
            y = MatMul (h, w)
        }""")
    model.graph.initializer.extend([numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float16), "gamma"),
                                    numpy_helper.from_array(rng.standard_normal(16).astype(np.float16), "beta"),
                                    numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float16), "w")])
    path = tmp_path / "h.onnx"
    onnx.save(model, str(path))
    result = smooth(path, calib=[{"x": outlier_feed(rng, (8, 16)).astype(np.float16)}])
    feed = {"x": outlier_feed(rng, (4, 16)).astype(np.float16)}
    # fp16 rounding of the rescaled constants, not smoothing, bounds this
    assert rel_err(run(path, feed), run(result.written[0], feed)) < 5e-3
    assert result.model.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
