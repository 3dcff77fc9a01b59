"""Outlier-channel split: exact in FP, then the quantized GEMM no longer sees the outliers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from conftest import initializer_arrays, rel_err, run
from passes import SmoothQuantConfig
from passes.search.alpha import SPLIT, SplitSmoothed
from passes.config import (CalibrationConfig, Granularity, QuantizationConfig, SmoothingConfig, Target, Unfoldable,
                           Precision, WeightRounding)
from passes.ir.errors import SmoothQuantError
from passes.ir.graph import GraphView
from passes.linear import find_linear_ops
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import TensorStore, load_model
from passes.patterns import FoldKind
from passes.pipeline import run_smoothquant
from passes.split import outlier_channels, split_outliers, splittable
from test_quantize import row_cosine

QUIET = CalibrationConfig(progress=False)
K, N = 256, 24
OUTLIERS = [5, 140]


def test_outlier_channels_picks_channels_far_above_the_99th_percentile():
    amax = np.ones(1000)
    amax[[3, 500]] = [10.0, 2.5]
    amax[7] = 1.9  # under 2x the 99th percentile (1.0)
    assert outlier_channels(amax, 2.0).tolist() == [3, 500]
    assert outlier_channels(amax, 3.0).tolist() == [3]
    assert outlier_channels(np.ones(8)).size == 0
    assert outlier_channels(np.array([1.0, np.inf])).size == 0
    with pytest.raises(ValueError, match=r"\[C\]"):
        outlier_channels(np.ones((2, 3)))
    with pytest.raises(ValueError, match=">= 1"):
        outlier_channels(np.ones(4), 0.5)


def gelu_mlp(tmp_path, op: str = "MatMul"):
    """x -> GELU (erf form, scalar 0.5 as ORT fuses it) -> linear (+ bias): the GELU output has two
    input channels 20x larger than the rest."""
    rng = np.random.default_rng(0)
    linear = ("y0 = MatMul (h, w)\n y = Add (y0, b)" if op == "MatMul"
              else "y = Gemm <transB = 1, alpha = 0.5> (h, wt, b)")
    tokens = "B, T" if op == "MatMul" else "T"  # Gemm takes 2-D inputs
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{tokens}, {K}] x) => (float[{tokens}, {N}] y) {{
            xs = Mul (x, amp)
            u = Div (xs, sqrt2)
            e = Erf (u)
            e1 = Add (e, one)
            p = Mul (xs, e1)
            h = Mul (p, half)
            {linear}
        }}""")
    amp = np.ones(K, np.float32)
    amp[OUTLIERS] = 20.0
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    consts = {"amp": amp, "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
              "half": np.array(0.5, np.float32), "b": rng.normal(0, 1, N).astype(np.float32),
              "w": w, "wt": np.ascontiguousarray(w.T)}
    used = {i for n in model.graph.node for i in n.input}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items() if k in used)
    path = tmp_path / f"gelu_{op}.onnx"
    onnx.save(model, str(path))
    calib, test = ((32, 8, K), (16, 8, K)) if op == "MatMul" else ((256, K), (128, K))
    np.savez(tmp_path / f"gelu_{op}.calib.npz", x=rng.normal(0, 1, calib).astype(np.float32))
    return path, {"x": rng.normal(0, 1, test).astype(np.float32)}


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_split_is_exact_in_fp(tmp_path, op):
    path, feeds = gelu_mlp(tmp_path, op)
    loaded = load_model(path)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    ops, _ = find_linear_ops(view)
    assert splittable(view, ops[0]) is None
    done = split_outliers(view, ops, ops[0].activation, np.array(OUTLIERS), NameFactory(view.all_names()))
    assert done[0].channels.tolist() == OUTLIERS
    masked = view.store.array(done[0].weight)
    assert not np.any(masked[OUTLIERS] if op == "MatMul" else masked[:, OUTLIERS])
    assert rel_err(run(path, feeds), run(loaded.proto, feeds)) < 1e-6


def quantize(path, out, unfoldable=Unfoldable.AUTO, rounding=WeightRounding.NEAREST, **smoothing):
    return run_smoothquant(path, out, config=SmoothQuantConfig(
        SmoothingConfig(unfoldable=unfoldable, **smoothing), QUIET,
        QuantizationConfig(target=Target.ONNXRUNTIME, weight_rounding=rounding)))


@pytest.mark.parametrize("rounding", list(WeightRounding))
def test_onnxruntime_target_splits_gelu_outliers_and_is_more_accurate(tmp_path, rounding):
    path, feeds = gelu_mlp(tmp_path)
    ref = run(path, feeds)[0]
    split = quantize(path, tmp_path / "split.onnx", rounding=rounding)  # AUTO: split for ORT per-tensor
    kinds = [g.kind for g in split.report.groups]
    assert kinds == [FoldKind.SPLIT]
    assert "2 of 256 input channels computed in FP" in split.report.groups[0].detail
    model = onnx.load(str(tmp_path / "split.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulIntegerToFloat" in ops and ops.count("Gather") == 1 and "Mul" in ops  # GELU's own Muls
    assert not [n for n in model.graph.node if n.op_type == "Mul" and n.name.startswith("sq_")]
    kernel = next(n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat")
    assert len(kernel.input) == 7  # the bias Add stays fused; the FP term is added after it
    w_q = initializer_arrays(tmp_path / "split.onnx")[kernel.input[1]]
    assert not np.any(w_q[OUTLIERS])  # GPTQ too keeps the split rows at zero
    skip = quantize(path, tmp_path / "skip.onnx", Unfoldable.SKIP, rounding)
    mul = quantize(path, tmp_path / "mul.onnx", Unfoldable.MUL, rounding)
    assert [g.kind for g in skip.report.groups] == [None]
    assert [g.kind for g in mul.report.groups] == [FoldKind.MUL]
    cos = {name: row_cosine(ref, run(tmp_path / f"{name}.onnx", feeds)[0]).mean() for name in ("split", "skip", "mul")}
    errs = {name: rel_err([ref], run(tmp_path / f"{name}.onnx", feeds)) for name in ("split", "skip", "mul")}
    assert errs["split"] < 0.5 * errs["skip"], (errs, cos)
    assert cos["split"] > 0.999, cos


def test_split_group_without_outliers_is_skipped_with_the_reason(tmp_path):
    path, _ = gelu_mlp(tmp_path)
    result = quantize(path, tmp_path / "q.onnx", split_ratio=100.0)
    group = result.report.groups[0]
    assert group.kind is None and "no channel's max|X| exceeds 100x" in group.detail


def test_tensorrt_target_folds_gelu_with_one_alpha_and_the_search_weighs_the_split(tmp_path):
    path, _ = gelu_mlp(tmp_path)
    result = run_smoothquant(path, tmp_path / "q.onnx", config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET))
    assert [g.kind for g in result.report.groups] == [FoldKind.NORM]  # GELU's 0.5 absorbs 1/s
    searched = run_smoothquant(path, tmp_path / "s.onnx", config=SmoothQuantConfig(calibration=QUIET))
    choice = searched.alpha_choices[0]
    assert {None, SPLIT, 0.5} <= set(choice.errors) and choice.errors[choice.alpha] == min(choice.errors.values())


def test_split_needs_per_tensor_quantization():
    with pytest.raises(SmoothQuantError, match="needs quantization"):
        SmoothQuantConfig(SmoothingConfig(unfoldable=Unfoldable.SPLIT), quantization=None)
    with pytest.raises(SmoothQuantError, match="per-tensor"):
        SmoothQuantConfig(SmoothingConfig(unfoldable=Unfoldable.SPLIT),
                          quantization=QuantizationConfig(granularity=Granularity.PER_TOKEN))
    with pytest.raises(SmoothQuantError, match="split ratio"):
        SmoothingConfig(split_ratio=0.5)
    per_token = SmoothQuantConfig(quantization=QuantizationConfig(target=Target.ONNXRUNTIME,
                                                                  granularity=Granularity.PER_TOKEN))
    assert per_token.unfoldable is Unfoldable.AUTO  # AUTO splits only per-tensor ORT
    assert SmoothQuantConfig(quantization=QuantizationConfig(target=Target.ONNXRUNTIME)).unfoldable \
        is Unfoldable.SPLIT


def test_no_smoothing_is_the_plain_baseline_without_splits(tmp_path):
    path, _ = gelu_mlp(tmp_path)
    result = run_smoothquant(path, tmp_path / "q.onnx", config=SmoothQuantConfig(
        SmoothingConfig(enabled=False), QUIET, QuantizationConfig(target=Target.ONNXRUNTIME)))
    assert [(g.kind, g.detail) for g in result.report.groups] == [(None, "smoothing disabled")]


def test_explicit_split_for_tensorrt_passes_its_rule_checker(tmp_path):
    """A graph input cannot absorb 1/s; with --unfoldable split its outlier channels go to FP, and
    the output still satisfies TensorRT's explicit-quantization rules (checked by the pipeline)."""
    rng = np.random.default_rng(1)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[T, {K}] x) => (float[T, {N}] y) {{
            y = MatMul (x, w)
        }}""")
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(0, 0.2, (K, N)).astype(np.float32), "w"))
    path = tmp_path / "input.onnx"
    onnx.save(model, str(path))
    calib = rng.normal(0, 1, (256, K)).astype(np.float32)
    calib[:, OUTLIERS] *= 30
    np.savez(tmp_path / "input.calib.npz", x=calib)
    result = run_smoothquant(path, tmp_path / "q.onnx", config=SmoothQuantConfig(
        SmoothingConfig(unfoldable=Unfoldable.SPLIT), QUIET, QuantizationConfig(target=Target.TENSORRT)))
    assert [g.kind for g in result.report.groups] == [FoldKind.SPLIT]
    feeds = {"x": calib[:64]}
    plain = run_smoothquant(path, tmp_path / "plain.onnx", config=SmoothQuantConfig(
        SmoothingConfig(unfoldable=Unfoldable.SKIP), QUIET, QuantizationConfig(target=Target.TENSORRT)))
    assert [g.kind for g in plain.report.groups] == [None]
    ref = run(path, feeds)
    assert rel_err(ref, run(tmp_path / "q.onnx", feeds)) < 0.25 * rel_err(ref, run(tmp_path / "plain.onnx", feeds))


def test_no_smoothing_does_not_claim_the_model_is_written_unchanged(tmp_path):
    path, _ = gelu_mlp(tmp_path)
    result = run_smoothquant(path, tmp_path / "q.onnx", config=SmoothQuantConfig(
        SmoothingConfig(enabled=False), QUIET, QuantizationConfig(target=Target.ONNXRUNTIME)))
    assert not [m for m in result.messages if "unchanged" in m or "no smoothable pattern" in m], result.messages
    assert result.quant_report.quantized


def test_alpha_search_offers_the_split_unless_skip_or_mul_is_asked(tmp_path):
    """A LayerNorm-like group (foldable) whose input has two outlier channels: the α search also
    measures the split form and keeps it where it wins; an explicit --unfoldable mul takes it out."""
    rng = np.random.default_rng(2)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[T, {K}] x) => (float[T, {N}] y) {{
            h = Mul (x, gamma)
            y = MatMul (h, w)
        }}""")
    gamma = np.ones(K, np.float32)
    gamma[OUTLIERS] = 40.0
    model.graph.initializer.extend([numpy_helper.from_array(gamma, "gamma"),
                                    numpy_helper.from_array(rng.normal(0, 0.2, (K, N)).astype(np.float32), "w")])
    path = tmp_path / "norm.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "norm.calib.npz", x=rng.normal(0, 1, (256, K)).astype(np.float32))
    feeds = {"x": rng.normal(0, 1, (64, K)).astype(np.float32)}

    def search(unfoldable):
        return run_smoothquant(path, tmp_path / f"{unfoldable.value}.onnx", config=SmoothQuantConfig(
            SmoothingConfig(alpha_grid=(0.5,), unfoldable=unfoldable), QUIET,
            QuantizationConfig(weight_rounding=WeightRounding.NEAREST)))

    offered, without = search(Unfoldable.AUTO), search(Unfoldable.MUL)
    assert search(Unfoldable.SPLIT).alpha_choices == offered.alpha_choices
    errors = offered.alpha_choices[0].errors
    assert set(errors) == {None, SPLIT, 0.5, SplitSmoothed(0.5)} and set(without.alpha_choices[0].errors) == {None, 0.5}
    # measured: 2.4e-5 split+α=0.5, 3.1e-5 split, 6.7e-4 at α=0.5, 1.7e-2 unsmoothed
    assert errors[SplitSmoothed(0.5)] < errors[SPLIT] < 0.2 * errors[0.5] < errors[None], errors
    assert [(g.kind, g.split_channels) for g in offered.report.groups] == [(FoldKind.NORM, 2)]
    assert [(g.kind, g.split_channels) for g in without.report.groups] == [(FoldKind.NORM, 0)]
    ref = run(path, feeds)
    assert rel_err(ref, run(tmp_path / "auto.onnx", feeds)) < 0.5 * rel_err(ref, run(tmp_path / "mul.onnx", feeds))


def test_layer_sqnr_skips_the_partial_sums_of_split_ops(tmp_path):
    """A split MatMul's own output lacks its FP channels' term (added after the bias Add): the
    model's metadata lists it, so evaluate's per-layer SQNR does not report it as a loss."""
    import json

    from passes.evaluate import layer_sqnr
    from passes.pipeline import RESCALED_OUTPUTS_KEY

    path, feeds = gelu_mlp(tmp_path)
    quantize(path, tmp_path / "q.onnx")  # ORT target: the GELU group is split
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    assert json.loads(meta[RESCALED_OUTPUTS_KEY]) == ["y0"]
    assert layer_sqnr(path, tmp_path / "q.onnx", {"x": feeds["x"][:1]}) == []


def test_search_combines_the_split_with_smoothing_where_both_pay(tmp_path):
    """Two 60x channels no α tames without starving the weights, and a spread of 2-8x channels that
    the split alone leaves at one coarse step: the search picks split+α (TensorRT target, GELU's
    scalar absorbs 1/s), and the model beats the best α without the split."""
    path, _ = gelu_mlp(tmp_path)
    model = onnx.load(str(path))
    amp = next(t for t in model.graph.initializer if t.name == "amp")
    values = np.ones(K, np.float32)
    values[np.arange(10, 10 + 48)] = np.linspace(2.0, 8.0, 48)
    values[OUTLIERS] = 60.0
    amp.CopyFrom(numpy_helper.from_array(values, "amp"))
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(0, 1, (16, 8, K)).astype(np.float32)}
    ref = run(path, feeds)
    best = run_smoothquant(path, tmp_path / "q.onnx", config=SmoothQuantConfig(
        SmoothingConfig(), QUIET, QuantizationConfig(weight_rounding=WeightRounding.NEAREST)))
    choice = best.alpha_choices[0]
    assert isinstance(choice.alpha, SplitSmoothed), choice.errors
    alone = min(e for c, e in choice.errors.items() if not isinstance(c, SplitSmoothed))
    assert choice.errors[choice.alpha] < 0.5 * alone, choice.errors
    [group] = best.report.groups
    assert group.kind is FoldKind.NORM and group.split_channels == 2
    assert "2 of 256 input channels computed in FP" in group.notes[-1]
    assert "1 smoothed groups also have their outlier channels split" in best.report.summary()
    no_split = run_smoothquant(path, tmp_path / "a.onnx", config=SmoothQuantConfig(
        SmoothingConfig(unfoldable=Unfoldable.SKIP), QUIET, QuantizationConfig(weight_rounding=WeightRounding.NEAREST)))
    assert not isinstance(no_split.alpha_choices[0].alpha, SplitSmoothed)
    err = rel_err(ref, run(tmp_path / "q.onnx", feeds))
    assert err < 0.5 * rel_err(ref, run(tmp_path / "a.onnx", feeds)), err


def test_split_with_smoothing_is_offered_to_int8_for_tensorrt_only(tmp_path):
    """FP8 keeps ordinary channels' precision beside a large one; ONNX Runtime pays for every split
    op: neither is offered split+α (the plain split stays a candidate)."""
    path, _ = gelu_mlp(tmp_path)
    for name, q in (("fp8", QuantizationConfig(precision=Precision.FP8)),
                    ("ort", QuantizationConfig(target=Target.ONNXRUNTIME))):
        result = run_smoothquant(path, tmp_path / f"{name}.onnx", config=SmoothQuantConfig(
            SmoothingConfig(unfoldable=Unfoldable.SPLIT), QUIET,
            replace(q, weight_rounding=WeightRounding.NEAREST)))
        errors = result.alpha_choices[0].errors
        assert SPLIT in errors and not any(isinstance(c, SplitSmoothed) for c in errors), (name, errors)
