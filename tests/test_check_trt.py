"""TensorRT rule checker: clean on every output of ours, and each rule caught when broken on purpose."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import SmoothQuantConfig
from passes.check_trt import Rule, check_model, main
from passes.config import Precision, QuantizationConfig, WeightStorage
from passes.pipeline import run_smoothquant


def qdq_matmul(tmp_path, opset=13, act_scale=0.05, act_zero=np.int8(0), w=None, w_scale=None, w_zero=None,
               axis=1, extra=(), output="y", elem=TensorProto.FLOAT):
    """``y = DQ(Q(x)) @ DQ(w_q)``: x [2, 4, 8] float, w_q [8, 6] int8 per output channel; a clean model by default."""
    w = np.arange(-24, 24, dtype=np.int8).reshape(8, 6) if w is None else w
    w_scale = np.full(6, 0.01, np.float32) if w_scale is None else w_scale
    w_zero = np.zeros(w_scale.shape, np.int8) if w_zero is None else w_zero
    inits = [numpy_helper.from_array(np.asarray(act_scale, np.float32), "a_scale"),
             numpy_helper.from_array(np.asarray(act_zero), "a_zero"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(w_zero, "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zero"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="dq_w", axis=axis),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul")]
    for node in extra:
        nodes.append(node)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [2, 4, 8])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, 4, 6] if output == "y" else [2, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def rules(path) -> dict[Rule, list[str]]:
    found: dict[Rule, list[str]] = {}
    for v in check_model(path).violations:
        found.setdefault(v.rule, []).append(v.node)
    return found


def test_clean_model_passes(tmp_path):
    report = check_model(qdq_matmul(tmp_path))
    assert report.ok and report.qdq_nodes == 3 and report.quantized_gemms == 1


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bert", "tiny_bert_legacy"])
@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("weights", list(WeightStorage))
def test_every_output_of_ours_passes(demo_dir, tmp_path, name, precision, weights):
    config = SmoothQuantConfig(quantization=QuantizationConfig(precision=precision, weights=weights, check=False))
    result = run_smoothquant(demo_dir / f"{name}.onnx", tmp_path / "q.onnx", config=config)
    report = check_model(tmp_path / "q.onnx")
    assert report.ok, report.summary()
    assert report.quantized_gemms == len(result.quant_report.quantized) > 0


BROKEN = {
    Rule.ZERO_POINT_ZERO: (dict(act_zero=np.int8(3)), "q_x"),
    Rule.ZERO_POINT_TYPE: (dict(act_zero=np.uint8(0)), "q_x"),
    Rule.SCALE_VALUE: (dict(w_scale=np.array([0.01, 0.01, 0.0, 0.01, 0.01, 0.01], np.float32)), "dq_w"),
    Rule.AXIS_LENGTH: (dict(w_scale=np.full(8, 0.01, np.float32), w_zero=np.zeros(8, np.int8)), "dq_w"),
    Rule.PER_AXIS_ON_WEIGHTS: (dict(act_scale=np.full(8, 0.05, np.float32), act_zero=np.zeros(8, np.int8)), "q_x"),
    Rule.WEIGHT_RANGE: (dict(w=np.full((8, 6), -128, np.int8)), "dq_w"),
    Rule.FP8_OPSET: (dict(act_zero=np.zeros((), np.float32).astype(__import__("ml_dtypes").float8_e4m3fn)), "q_x"),
    Rule.NO_QDQ_OUTPUT: (dict(output="x_dq"), "dq_x"),
}


@pytest.mark.parametrize("rule", list(BROKEN), ids=lambda r: r.value)
def test_each_broken_rule_is_caught(tmp_path, rule):
    kwargs, node = BROKEN[rule]
    found = rules(qdq_matmul(tmp_path, **kwargs))
    assert node in found.get(rule, []), found


def test_scale_must_be_constant(tmp_path):
    path = qdq_matmul(tmp_path)
    model = onnx.load(str(path))
    # The activation scale becomes a run-time value: Abs(a_scale_input) of a graph input.
    model.graph.input.append(helper.make_tensor_value_info("s_in", TensorProto.FLOAT, []))
    model.graph.node.insert(0, helper.make_node("Abs", ["s_in"], ["s_rt"], name="abs"))
    for node in model.graph.node:
        if node.name in ("q_x", "dq_x"):
            node.input[1] = "s_rt"
    onnx.save(model, str(path))
    found = rules(path)
    assert found[Rule.SCALE_CONSTANT] == ["q_x", "dq_x"]


def test_scale_type_must_match_the_input(tmp_path):
    path = qdq_matmul(tmp_path)
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == "a_scale":
            t.CopyFrom(numpy_helper.from_array(np.array(0.05, np.float16), "a_scale"))
    onnx.save(model, str(path))
    assert "q_x" in rules(path)[Rule.SCALE_TYPE]


def test_q_must_feed_dq_only(tmp_path):
    extra = [helper.make_node("Cast", ["x_q"], ["x_cast"], name="cast", to=TensorProto.FLOAT)]
    assert rules(qdq_matmul(tmp_path, extra=extra))[Rule.Q_FEEDS_DQ] == ["q_x"]


def test_gemm_needs_dq_on_both_inputs(tmp_path):
    path = qdq_matmul(tmp_path)
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((8, 6), np.float32), "w_fp"))
    next(n for n in model.graph.node if n.name == "matmul").input[1] = "w_fp"
    onnx.save(model, str(path))
    assert rules(path)[Rule.GEMM_BOTH_DQ] == ["matmul"]


def test_cli(tmp_path, capsys):
    assert main([str(qdq_matmul(tmp_path))]) == 0
    assert "no TensorRT rule violated" in capsys.readouterr().out
    assert main([str(qdq_matmul(tmp_path, act_zero=np.int8(3)))]) == 1
    out = capsys.readouterr().out
    assert "[zero-point-zero] q_x" in out and "2 violations" in out
    assert main([str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx" in capsys.readouterr().err


def test_pipeline_refuses_to_write_a_model_that_breaks_the_rules(demo_dir, tmp_path, monkeypatch):
    import passes.pipeline as pipeline
    from passes.check_trt import CheckReport, Violation
    from passes.ir.errors import SmoothQuantError

    broken = CheckReport([Violation(Rule.ZERO_POINT_ZERO, "sq_q::x", "zero point 'z' is not all zero")])
    monkeypatch.setattr(pipeline, "check_graph", lambda view, opset: broken)
    with pytest.raises(SmoothQuantError, match=r"breaks TensorRT's rules \(nothing written\):\n  \[zero-point-zero\] sq_q::x"):
        run_smoothquant(demo_dir / "tiny_bert.onnx", tmp_path / "q.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_defaults_are_checked(tmp_path):
    """A QuantizeLinear without a zero point outputs UINT8 (ONNX's default); opset 21's output_dtype
    can say UINT8 too: TensorRT takes neither."""
    path = qdq_matmul(tmp_path)
    model = onnx.load(str(path))
    q = next(n for n in model.graph.node if n.name == "q_x")
    del q.input[2]
    onnx.save(model, str(path))
    assert rules(path)[Rule.ZERO_POINT_TYPE] == ["q_x"]
    q.attribute.append(helper.make_attribute("output_dtype", TensorProto.UINT8))
    model.opset_import[0].version = 21
    onnx.save(model, str(path))
    assert rules(path)[Rule.ZERO_POINT_TYPE] == ["q_x"]


def test_qdq_inside_subgraphs_is_checked(tmp_path):
    """Q/DQ in an If branch, with a scale from the outer scope: clean when right, each violation
    named ``if_node/inner_node`` when wrong."""
    def model_with_branch(scale: float):
        inner = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "b_scale", "b_zero"], ["bq"], name="branch_q"),
             helper.make_node("DequantizeLinear", ["bq", "b_scale", "b_zero"], ["bdq"], name="branch_dq"),
             helper.make_node("MatMul", ["bdq", "w_f"], ["by"], name="branch_mm")],
            "then", [], [helper.make_tensor_value_info("by", TensorProto.FLOAT, [2, 4, 6])])
        other = helper.make_graph([helper.make_node("MatMul", ["x", "w_f"], ["ey"], name="else_mm")], "else", [],
                                  [helper.make_tensor_value_info("ey", TensorProto.FLOAT, [2, 4, 6])])
        inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "b_scale"),
                 numpy_helper.from_array(np.int8(0), "b_zero"),
                 numpy_helper.from_array(np.ones((8, 6), np.float32), "w_f")]
        graph = helper.make_graph(
            [helper.make_node("If", ["flag"], ["y"], then_branch=inner, else_branch=other, name="cond")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
             helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6])], inits)
        path = tmp_path / "branch.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(path))
        return path

    report = check_model(model_with_branch(0.05))
    assert report.qdq_nodes == 2 and report.violations and rules(model_with_branch(0.05)) == {
        Rule.GEMM_BOTH_DQ: ["cond/branch_mm"]}  # the weight of the branch's MatMul is not dequantized
    assert rules(model_with_branch(-1.0))[Rule.SCALE_VALUE] == ["cond/branch_q", "cond/branch_dq"]
