"""Tied embeddings: an LM head reading ``Transpose(E)`` is smoothed and quantized on its own copy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

from conftest import rel_err, run
from passes import SmoothQuantConfig
from passes.config import CalibrationConfig, QuantizationConfig, SmoothingConfig
from passes.pipeline import run_smoothquant
from test_quantize import row_cosine

QUIET = CalibrationConfig(progress=False)
VOCAB, HIDDEN = 64, 16


def tied_lm(tmp_path):
    """ids -> Gather(E) -> Mul(gamma) -> MatMul(h, Transpose(E)): one embedding read twice."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, T] ids) => (float[N, T, 64] logits) {
            e = Gather (emb, ids)
            h = Mul (e, gamma)
            et = Transpose <perm = [1, 0]> (emb)
            logits = MatMul (h, et)
        }""")
    emb = rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32)
    emb[:, 3] *= 30  # an outlier channel, so smoothing has work to do
    gamma = rng.uniform(0.5, 2, HIDDEN).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(gamma, "gamma")])
    path = tmp_path / "tied.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "tied.calib.npz", ids=rng.integers(0, VOCAB, (32, 12)))
    return path, emb, {"ids": rng.integers(0, VOCAB, (8, 12))}


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_tied_head_is_quantized_on_its_own_copy(tmp_path):
    path, emb, feeds = tied_lm(tmp_path)
    out = tmp_path / "q.onnx"
    default = run_smoothquant(path, out, config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET))
    assert not default.quant_report.quantized  # tied heads stay FP unless asked
    result = run_smoothquant(path, out, config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET,
                                                                 QuantizationConfig(quantize_tied=True)))
    assert result.quant_report.quantized == ["logits"]
    assert any("tied embedding" in m for m in result.messages)
    model = onnx.load(str(out))
    assert not [n for n in model.graph.node if n.op_type == "Transpose"]
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    assert np.array_equal(initializers(out)[gather.input[0]], emb)  # the embedding itself is untouched
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert {n.output[0]: n.op_type for n in model.graph.node}[matmul.input[1]] == "DequantizeLinear"
    ref, got = run(path, feeds)[0], run(out, feeds)[0]
    assert row_cosine(ref, got).mean() > 0.999


def test_smoothed_but_unquantized_copy_is_exact_and_unsmoothed_fp_head_is_tied_again(tmp_path):
    path, _, feeds = tied_lm(tmp_path)
    ref = run(path, feeds)
    # smoothed, kept FP by --exclude: the head keeps its (scaled) copy, the model is exact
    kept = run_smoothquant(path, tmp_path / "k.onnx", config=SmoothQuantConfig(
        SmoothingConfig(0.5), QUIET, QuantizationConfig(exclude=("logits",), quantize_tied=True)))
    assert kept.report.count(None) == 0 and not kept.quant_report.quantized
    assert rel_err(ref, run(tmp_path / "k.onnx", feeds)) < 1e-5
    # neither smoothed nor quantized: the Transpose comes back and no copy is written
    plain = run_smoothquant(path, tmp_path / "p.onnx", config=SmoothQuantConfig(
        SmoothingConfig(enabled=False), QUIET, QuantizationConfig(exclude=("logits",), quantize_tied=True)))
    assert any("reads Transpose of the tied weight again" in m for m in plain.messages)
    assert set(initializers(tmp_path / "p.onnx")) == {"emb", "gamma"}
    assert [n.op_type for n in onnx.load(str(tmp_path / "p.onnx")).graph.node] == ["Gather", "Mul", "Transpose",
                                                                                   "MatMul"]
    assert rel_err(ref, run(tmp_path / "p.onnx", feeds)) == 0
    # smooth-only leaves the tie alone
    smooth = run_smoothquant(path, tmp_path / "s.onnx", config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET, None))
    assert not smooth.report.smoothed and set(initializers(tmp_path / "s.onnx")) == {"emb", "gamma"}
