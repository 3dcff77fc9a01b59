"""Subgraphs are graphs: If/Loop bodies that read outer tensors keep reading what they read before.

The models smooth and quantize an activation and a weight that a branch (or a loop body) also reads
from the outer scope, and keep a constant that only a body reads. Smoothing alone must stay exact on
every branch; quantized, the body's own outputs must be untouched (linear ops inside bodies stay FP)
and the model must load and run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_err, run
from passes.config import SmoothingConfig, SmoothQuantConfig
from passes.ir.graph import GraphView, graph_names, implicit_inputs, replace_input
from passes.ir.onnx_io import TensorStore, load_model
from passes.pipeline import run_smoothquant
from test_quant_options import QUIET, config

K, N = 16, 8


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def branchy_model(path, loop: bool = False):
    """x -> LayerNorm -> h -> MatMul(w) -> y; an If on ``flag`` whose then-branch reads h and w
    (h * c_then, then @ w) and whose else-branch returns h + c_else; c_then, c_else are read only
    there. ``loop``: a Loop body instead reads h, c_then and w for two iterations (while ``flag``)."""
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 2, K).astype(np.float32)
    gamma[3] = 30.0  # an outlier channel, so smoothing moves something
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("gamma", gamma), ("beta", rng.normal(size=K).astype(np.float32)),
        ("w", rng.normal(0, 0.3, (K, N)).astype(np.float32)), ("c_then", rng.normal(size=K).astype(np.float32)),
        ("c_else", rng.normal(size=K).astype(np.float32)))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    r3, r4 = ["a", "b", "c"], ["t", "a", "b", "c"]
    if loop:
        body = helper.make_graph(
            [helper.make_node("Mul", ["h", "c_then"], ["hm"], name="body_mul"),
             helper.make_node("MatMul", ["hm", "w"], ["step"], name="body_fc"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
            "body", [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, [])],
            [_vi("cond_out", TensorProto.BOOL, []), _vi("step", TensorProto.FLOAT, r3)])
        inits.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
        nodes.append(helper.make_node("Loop", ["trips", "flag"], ["z"], body=body, name="loop"))
    else:
        then = helper.make_graph([helper.make_node("Mul", ["h", "c_then"], ["t0"], name="then_mul"),
                                  helper.make_node("MatMul", ["t0", "w"], ["t1"], name="then_fc")],
                                 "then", [], [_vi("t1", TensorProto.FLOAT, r3)])
        other = helper.make_graph([helper.make_node("Add", ["h", "c_else"], ["e0"], name="else_add"),
                                   helper.make_node("ReduceSum", ["e0"], ["e1"], keepdims=1, name="else_sum")],
                                  "else", [], [_vi("e1", TensorProto.FLOAT, r3)])
        nodes.append(helper.make_node("If", ["flag"], ["z"], then_branch=then, else_branch=other, name="branch"))
    graph = helper.make_graph(nodes, "g", [_vi("x", TensorProto.FLOAT, ["n", 4, K]), _vi("flag", TensorProto.BOOL, [])],
                              [_vi("y", TensorProto.FLOAT, ["n", 4, N]), _vi("z", TensorProto.FLOAT, r4 if loop else r3)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    x = rng.normal(size=(8, 4, K)).astype(np.float32)
    return [{"x": x[i:i + 4], "flag": np.array(True)} for i in (0, 4)]


def close(ref: list, got: list) -> float:
    """Relative error over the non-empty outputs (a Loop that runs zero times returns an empty z)."""
    assert [r.shape for r in ref] == [g.shape for g in got]
    pairs = [(r, g) for r, g in zip(ref, got) if r.size]
    return rel_err([r for r, _ in pairs], [g for _, g in pairs]) if pairs else 0.0


def feeds(flag: bool) -> dict:
    rng = np.random.default_rng(5)
    return {"x": rng.normal(size=(3, 4, K)).astype(np.float32), "flag": np.array(flag)}


def test_bodies_read_outer_tensors_and_count_as_their_consumers(tmp_path):
    branchy_model(tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    model = loaded.proto
    view = GraphView(model.graph, TensorStore(loaded))
    branch = next(n for n in model.graph.node if n.op_type == "If")
    assert implicit_inputs(branch) == {"h", "w", "c_then", "c_else"}
    assert branch in view.consumers["h"] and branch in view.consumers["c_then"]
    assert not view.exclusive("h", [next(n for n in model.graph.node if n.op_type == "MatMul")])
    assert {"then_mul", "t0", "e1"} <= graph_names(model.graph) == view.all_names()
    view.drop_unused_initializers()
    assert {"c_then", "c_else"} <= {t.name for t in model.graph.initializer}  # read only inside the branches
    replace_input(branch, "h", "h2")
    assert implicit_inputs(branch) == {"h2", "w", "c_then", "c_else"}


@pytest.mark.parametrize("loop", [False, True], ids=["if", "loop"])
def test_smoothing_alone_stays_exact_on_every_branch(tmp_path, loop):
    calib = branchy_model(tmp_path / "m.onnx", loop)
    result = run_smoothquant(tmp_path / "m.onnx", tmp_path / "s.onnx", calib=calib,
                             config=SmoothQuantConfig(SmoothingConfig(0.5), QUIET, None))
    assert result.report.count(None) == 0 and len(result.report.groups) == 1  # h -> fc was smoothed
    for flag in (True, False):
        ref, got = run(tmp_path / "m.onnx", feeds(flag)), run(tmp_path / "s.onnx", feeds(flag))
        assert close(ref, got) < 1e-5, (flag, close(ref, got))
    assert "compensating" in " ".join(result.report.groups[0].notes)  # the body reads the restored h


@pytest.mark.parametrize("loop", [False, True], ids=["if", "loop"])
def test_quantized_model_leaves_the_bodies_in_fp(tmp_path, loop):
    calib = branchy_model(tmp_path / "m.onnx", loop)
    result = run_smoothquant(tmp_path / "m.onnx", tmp_path / "q.onnx", calib=calib, config=config())
    assert result.quant_report.quantized == ["fc"]
    for flag in (True, False):
        ref, got = run(tmp_path / "m.onnx", feeds(flag)), run(tmp_path / "q.onnx", feeds(flag))
        assert close([ref[1]], [got[1]]) < 1e-5  # z: computed in the body, in FP, from the original h and w
        assert 0 < close([ref[0]], [got[0]]) < 0.05  # y: quantized
