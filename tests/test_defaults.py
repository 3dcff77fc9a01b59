"""The default run: the per-group search (one pass for every candidate), GPTQ, and their fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.data import CalibrationData
from conftest import run
from models.tiny import TinyConfig, write_demo
from passes import SmoothQuantConfig
from passes.search.alpha import SPLIT, SplitSmoothed
from passes.config import FAST_ALPHA, CalibrationConfig, Granularity, QuantizationConfig, SmoothingConfig, Target
from passes.ir.graph import GraphView
from passes.linear import find_linear_ops
from passes.ir.onnx_io import TensorStore, load_model
from passes.pipeline import run_smoothquant
from passes.qdq import ActivationRange, per_channel_weight_scale
from passes.search.sensitivity import Twin, columns_to_sample, measure_twins
from passes.smoothquant import main
from test_quantize import held_out, row_cosine

QUIET = CalibrationConfig(progress=False)


def wide_matmul(tmp_path, n_out=1024):
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.1, (32, n_out)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n_out])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(0, 1, (96, 32)).astype(np.float32)
    x[:, 5] *= 40
    return path, w, x


def numpy_error(x, w, scales=None):
    """Mean over tokens of the relative squared error of symmetric INT8 W8A8, in float64."""
    s = np.ones(x.shape[1]) if scales is None else scales
    xs, ws = x / s, w * s[:, None]
    a = np.abs(xs).max() / 127
    xq = np.clip(np.round(xs / a), -127, 127) * a
    step = per_channel_weight_scale(ws.astype(np.float32), 1).astype(np.float64)
    wq = np.clip(np.round(ws / step), -127, 127) * step
    y = x.astype(np.float64) @ w
    return float((((xq @ wq - y) ** 2).sum(1) / (y ** 2).sum(1)).mean())


def test_one_pass_measures_every_candidate_and_sampled_columns_are_exact(tmp_path):
    path, w, x = wide_matmul(tmp_path)
    loaded = load_model(path)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    op = find_linear_ops(view)[0][0]
    s = np.abs(x).max(0) ** 0.5 / np.abs(w).max(1) ** 0.5
    twins = [Twin(op, "none", ActivationRange(float(x.min()), float(x.max()))),
             Twin(op, "smoothed", ActivationRange(float((x / s).min()), float((x / s).max())), s, trial="a")]
    data = CalibrationData([{"x": x}])
    sampled = measure_twins(loaded, loaded.proto, twins, 17, QuantizationConfig(), data, sample_columns=True,
                            progress=False)
    full = measure_twins(loaded, loaded.proto, twins, 17, QuantizationConfig(), data, progress=False)
    cols = columns_to_sample(1024)
    assert len(cols) == 128 and columns_to_sample(100) is None
    # Both candidates in one graph, each equal to NumPy on the sampled columns (ranges of symmetric INT8 = amax).
    np.testing.assert_allclose(sampled["none"].relative, numpy_error(x, w[:, cols]), rtol=2e-3)
    np.testing.assert_allclose(sampled["smoothed"].relative, numpy_error(x, w[:, cols], s), rtol=2e-3)
    np.testing.assert_allclose(full["none"].relative, numpy_error(x, w), rtol=2e-3)
    # The sample estimates the full error, and ranks the candidates the same way.
    for key in ("none", "smoothed"):
        assert abs(sampled[key].relative / full[key].relative - 1) < 0.2
    assert (sampled["smoothed"].relative < sampled["none"].relative) == (full["smoothed"].relative
                                                                         < full["none"].relative)
    # A token budget stops the pass early (one batch of 8 rows here).
    few = measure_twins(loaded, loaded.proto, twins, 17, QuantizationConfig(), CalibrationData([{"x": x[i:i + 8]}
                        for i in range(0, 96, 8)]), max_tokens=20, progress=False)
    assert few["none"].reference == 24


def test_search_in_chunks_under_a_twin_budget_gives_the_same_choices(demo_dir, tmp_path, monkeypatch):
    """Budget 0: a measuring pass per group instead of one for all; the errors are the same numbers."""
    model, calib = demo_dir / "tiny_llama.onnx", demo_dir / "tiny_llama.calib.npz"
    config = SmoothQuantConfig(calibration=QUIET)
    one = run_smoothquant(model, tmp_path / "a.onnx", calib=calib, config=config)
    monkeypatch.setattr("passes.search.sensitivity.TWIN_BUDGET_BYTES", 0)
    chunked = run_smoothquant(model, tmp_path / "b.onnx", calib=calib, config=config)
    assert len(one.alpha_choices) == 7 and [c.alpha for c in one.alpha_choices] == [c.alpha for c in
                                                                                    chunked.alpha_choices]
    for a, b in zip(one.alpha_choices, chunked.alpha_choices):
        assert a.errors.keys() == b.errors.keys()
        np.testing.assert_allclose([a.errors[k] for k in a.errors], [b.errors[k] for k in a.errors], rtol=1e-5)


def test_calibration_head_and_batch_count():
    feeds = [{"x": np.zeros((4, 2), np.float32)} for _ in range(5)]
    data = CalibrationData(feeds)
    assert data.num_batches() == 5  # a list knows its length: the progress bars have a total
    head = data.head(6)
    assert [len(f["x"]) for f in head.batches()] == [4, 2] and head.num_batches() == 2
    assert sum(1 for _ in data.batches()) == 5  # the original is unchanged


@pytest.fixture(scope="module")
def sink_llama(tmp_path_factory):
    """The demo decoder with a massive first-token activation (an attention sink's): its first
    down projection's input reaches thousands on token 0 only."""
    out = tmp_path_factory.mktemp("sink")
    return write_demo(out, ("tiny_llama",), TinyConfig(sink_value=300.0))[0]


def test_default_cli_searches_per_group_and_rounds_by_gptq(demo_dir, tmp_path, capsys):
    model = demo_dir / "tiny_llama.onnx"
    assert main([str(model), "-o", str(tmp_path / "d.onnx")]) == 0
    out = capsys.readouterr().out
    assert "per-group search over 7 groups" in out and "weights rounded by GPTQ" in out  # 2 without candidates
    assert main([str(model), "-o", str(tmp_path / "f.onnx"), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "per-group search" not in out and "weights rounded to nearest" in out
    feeds = held_out(demo_dir, "tiny_llama")
    ref = run(model, feeds)[0]
    cos = {k: row_cosine(ref, run(tmp_path / f"{k}.onnx", feeds)[0]).mean() for k in "df"}
    assert cos["d"] > cos["f"], cos


def test_api_defaults_are_the_cli_defaults():
    config = SmoothQuantConfig()
    assert config.smoothing.alpha is None and config.smoothing.searched
    resolved, notes = config.resolved(rereadable=True)
    assert resolved.quantization.weight_rounding.value == "gptq" and not notes
    fallback, notes = config.resolved(rereadable=False)
    assert fallback.smoothing.alpha == FAST_ALPHA and fallback.quantization.weight_rounding.value == "nearest"
    assert len(notes) == 2 and "not at hand" in notes[0]
    smooth_only, notes = SmoothQuantConfig(quantization=None).resolved(rereadable=True)
    assert smooth_only.smoothing.alpha == FAST_ALPHA and not notes


def test_one_pass_iterator_falls_back_with_a_note(demo_dir, tmp_path):
    with np.load(demo_dir / "tiny_llama.calib.npz") as z:
        feeds = iter([{"input_ids": z["input_ids"][i:i + 8]} for i in range(0, 64, 8)])
    result = run_smoothquant(demo_dir / "tiny_llama.onnx", tmp_path / "q.onnx", calib=feeds,
                             config=SmoothQuantConfig(calibration=QUIET))
    assert not result.alpha_choices and not result.quant_report.gptq
    assert any("every group gets α=0.8" in m for m in result.messages)


def test_massive_first_token_activation_is_split_by_default(sink_llama, tmp_path):
    """The one-token outlier sets a per-tensor step no α can fix; the default computes its channel in FP."""
    default = run_smoothquant(sink_llama, tmp_path / "d.onnx", config=SmoothQuantConfig(calibration=QUIET))
    amax = {g: default.stats.amax[g].max() / np.median(default.stats.amax[g]) for g in default.stats.amax}
    sink = max(amax, key=amax.get)
    assert amax[sink] > 50
    choice = next(c for c in default.alpha_choices if c.activation == sink)
    assert choice.split, choice.describe()  # measured: split+α=0.9 (E 0.005), split alone 0.026, none 0.56
    run_smoothquant(sink_llama, tmp_path / "a.onnx", config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET))
    feeds = held_out(sink_llama.parent, "tiny_llama")
    ref = run(sink_llama, feeds)[0]
    got = {k: row_cosine(ref, run(tmp_path / f"{k}.onnx", feeds)[0]).mean() for k in "da"}
    assert got["d"] > got["a"], got


def test_per_token_search_measures_per_token_twins(demo_dir, tmp_path):
    result = run_smoothquant(demo_dir / "tiny_llama.onnx", tmp_path / "q.onnx", config=SmoothQuantConfig(
        calibration=QUIET, quantization=QuantizationConfig(granularity=Granularity.PER_TOKEN, target=Target.ONNXRUNTIME)))
    assert result.alpha_choices and not any(c.split for c in result.alpha_choices)
    # a per-token scale cannot leave channels out: no split candidate at all
    assert all(k != SPLIT and not isinstance(k, SplitSmoothed) for c in result.alpha_choices for k in c.errors)
