"""The attention output projection's 1/s folded into the value projection, through P @ V."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from conftest import rel_err, run
from passes import SmoothQuantConfig
from passes.config import CalibrationConfig, QuantizationConfig, SmoothingConfig, Unfoldable
from passes.patterns import AttentionValueFold, FoldKind, ValuePath
from passes.pipeline import run_smoothquant

QUIET = CalibrationConfig(progress=False, batch_size=2)
B, T, D = 2, 6, 4  # batch, tokens, head size
SMOOTH_ONLY = SmoothQuantConfig(SmoothingConfig(0.8, attention_values=True), QUIET, None)


def attention(tmp_path, heads: int, kv_heads: int, layout: str = "heads") -> tuple:
    """q, k, v projections of x, softmax attention with ``kv_heads`` value heads repeated to
    ``heads`` (grouped-query attention when fewer), then the output projection ``o``. The
    attention output carries channel outliers. ``layout="mixed"`` contracts V's channel axis
    instead of its token axis (not an attention: must not be folded)."""
    c, ckv, g = heads * D, kv_heads * D, heads // kv_heads
    if layout == "heads":
        values = """
            vh = Reshape (v, vshape)
            vt = Transpose <perm = [0, 2, 1, 3]> (vh)
            vu = Unsqueeze (vt, two)
            ve = Expand (vu, eshape)
            vr = Reshape (ve, rshape)
            a = MatMul (p, vr)
            at = Transpose <perm = [0, 2, 1, 3]> (a)
            ctx = Reshape (at, cshape)"""
        scores = """
            qh = Reshape (q, qshape)
            qt = Transpose <perm = [0, 2, 1, 3]> (qh)
            kh = Reshape (k, qshape)
            kt = Transpose <perm = [0, 2, 3, 1]> (kh)
            s = MatMul (qt, kt)
            p = Softmax <axis = -1> (s)"""
        out = f"float[{B}, {T}, {c}] y"
    else:
        values = """
            vt = Transpose <perm = [0, 2, 1]> (v)
            ctx = MatMul (p, vt)"""
        scores = """
            s = MatMul (q, kq)
            p = Softmax <axis = -1> (s)"""  # p: [B, T, ckv], contracted with V's channels
        out = f"float[{B}, {T}, {c}] y"
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{B}, {T}, {c}] x) => ({out}) {{
            q = MatMul (x, wq)
            k0 = MatMul (x, wk)
            k = Add (k0, bk)
            v0 = MatMul (x, wv)
            v = Add (v0, bv)
            {scores}
            {values}
            y = MatMul (ctx, wo)
        }}""")
    rng = np.random.default_rng(heads * 10 + kv_heads)
    wv = rng.normal(0, 0.3, (c, ckv)).astype(np.float32)
    wv[:, 1] *= 40.0  # an outlier value channel: every attention output channel reading it is large
    consts = {"wq": rng.normal(0, 0.3, (c, c)), "wk": rng.normal(0, 0.3, (c, ckv)), "bk": rng.normal(0, 1, ckv),
              "wv": wv, "bv": rng.normal(0, 1, ckv), "wo": rng.normal(0, 0.3, (c, c)),
              "kq": rng.normal(0, 0.3, (c, ckv)),
              "vshape": np.array([B, T, kv_heads, D]), "qshape": np.array([B, T, -1, D]),
              "two": np.array([2]), "eshape": np.array([B, kv_heads, g, T, D]),
              "rshape": np.array([B, heads, T, D]), "cshape": np.array([B, T, c])}
    if layout == "heads":
        consts["wk"] = rng.normal(0, 0.3, (c, c))
        consts["bk"] = rng.normal(0, 1, c)
    else:
        consts["wo"] = rng.normal(0, 0.3, (T, c))
    used = {i for n in model.graph.node for i in n.input}
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f"
                                                                      else np.int64), k)
                                   for k, v in consts.items() if k in used)
    path = tmp_path / f"attn_{heads}_{kv_heads}_{layout}.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / f"{path.stem}.calib.npz", x=rng.normal(0, 1, (16, T, c)).astype(np.float32))
    return path, {"x": rng.normal(0, 1, (B, T, c)).astype(np.float32)}


@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (4, 2)])
def test_folding_into_the_value_projection_is_exact(tmp_path, heads, kv_heads):
    path, feeds = attention(tmp_path, heads, kv_heads)
    result = run_smoothquant(path, tmp_path / "s.onnx", config=SMOOTH_ONLY)
    groups = {g.activation: g for g in result.report.groups}
    assert groups["ctx"].kind is FoldKind.LINEAR and "value projection" in groups["ctx"].detail
    assert rel_err(run(path, feeds), run(tmp_path / "s.onnx", feeds)) < 1e-5
    # wv's columns absorbed 1/s (through the channel map), wo's rows took s; nothing was inserted
    model = onnx.load(str(tmp_path / "s.onnx"))
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in onnx.load(str(path)).graph.node]


def test_grouped_query_channels_share_their_value_column_scale(tmp_path):
    path, _ = attention(tmp_path, 4, 2)
    result = run_smoothquant(path, tmp_path / "s.onnx", config=SMOOTH_ONLY)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    s = after["wo"][:, 0] / before["wo"][:, 0]  # the row scale of each attention output channel
    # head h reads value head h // 2: channel h * D + d reads value column (h // 2) * D + d
    column = np.array([(h // 2) * D + d for h in range(4) for d in range(D)])
    for j in range(2 * D):
        assert np.ptp(s[column == j]) < 1e-5 * s[column == j].max()
    np.testing.assert_allclose(after["wv"] * s[[list(column).index(j) for j in range(2 * D)]], before["wv"],
                               rtol=1e-5)
    assert result.report.groups


def test_a_matmul_that_contracts_value_channels_is_not_folded(tmp_path):
    path, feeds = attention(tmp_path, 3, 3, layout="mixed")
    config = SmoothQuantConfig(SmoothingConfig(0.8, unfoldable=Unfoldable.SKIP, attention_values=True), QUIET, None)
    result = run_smoothquant(path, tmp_path / "s.onnx", config=config)
    group = next(g for g in result.report.groups if g.activation == "ctx")
    assert group.kind is None and "mix value channels" in group.detail, group
    assert rel_err(run(path, feeds), run(tmp_path / "s.onnx", feeds)) < 1e-5


def test_quantized_attention_output_projection_is_closer_with_the_fold(tmp_path):
    path, feeds = attention(tmp_path, 4, 2)
    ref = run(path, feeds)[0]
    errs = {}
    only_output = QuantizationConfig(exclude=(r"^(q|k0|v0)$",))  # quantize the output projection alone
    for name, smoothing in (("fold", SmoothingConfig(0.5, attention_values=True)),
                            ("none", SmoothingConfig(enabled=False))):
        run_smoothquant(path, tmp_path / f"{name}.onnx", config=SmoothQuantConfig(smoothing, QUIET, only_output))
        errs[name] = rel_err([ref], run(tmp_path / f"{name}.onnx", feeds)[:1])
    assert errs["fold"] < 0.5 * errs["none"], errs  # measured 0.0097 vs 0.0243


def test_tie_takes_the_maximum_over_channels_sharing_a_column():
    site = AttentionValueFold("v", ValuePath(None, (), None, ()), np.array([0, 1, 0, 1, 2]))
    np.testing.assert_array_equal(site.tie(np.array([1.0, 5.0, 3.0, 2.0, 7.0])), [3.0, 5.0, 3.0, 5.0, 7.0])


def test_cli_flag_folds_the_output_projection(tmp_path, capsys):
    from passes.smoothquant import main

    path, feeds = attention(tmp_path, 4, 2)
    out = tmp_path / "cli.onnx"
    assert main([str(path), "-o", str(out), "--alpha", "0.8", "--smooth-only", "--fold-attention-values",
                 "--batch-size", "2", "-v"]) == 0
    assert "via value projection 'v0' (through P @ V)" in capsys.readouterr().out
    assert rel_err(run(path, feeds), run(out, feeds)) < 1e-5
    assert main([str(path), "-o", str(tmp_path / "plain.onnx"), "--alpha", "0.8", "--smooth-only",
                 "--batch-size", "2", "-v"]) == 0
    assert "through P @ V" not in capsys.readouterr().out  # off by default
