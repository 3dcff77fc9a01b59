"""The in-graph calibrator against a NumPy reference computed from whole activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from calibrators import CalibrationData, ChannelStats, collect_channel_stats
from conftest import rel_err, run, text_like_feeds
from passes import SmoothQuantConfig, run_smoothquant
from passes.ir.graph import GraphView
from passes.linear import find_linear_ops
from passes.ir.onnx_io import TensorStore, load_model, save_model
from passes.smooth import stat_targets


def targets_of(path):
    loaded = load_model(path)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    return loaded, stat_targets(view, find_linear_ops(view)[0])


def reference_amax(path, targets, feeds):
    """Fetch every target activation whole and reduce it in NumPy."""
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t.tensor) for t in targets)
    outs = run(model, feeds)[-len(targets):]
    ref = {}
    for t, x in zip(targets, outs):
        axes = tuple(a for a in range(x.ndim) if a != (x.ndim - 1 if t.channel_axis == -1 else 1))
        ref[t.tensor] = (np.abs(x).max(axis=axes), x.min(axis=axes), x.max(axis=axes))
    return ref


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bert"])
def test_matches_numpy_reference(demo_dir, name):
    path = demo_dir / f"{name}.onnx"
    loaded, targets = targets_of(path)
    assert len(targets) == (9 if name == "tiny_llama" else 8)  # distinct linear inputs
    feeds = text_like_feeds(name, 5, samples=6)
    stats = collect_channel_stats(loaded, targets, CalibrationData([feeds]), progress=False)
    ref = reference_amax(path, targets, feeds)
    for t in targets:
        amax, lo, hi = ref[t.tensor]
        np.testing.assert_allclose(stats.amax[t.tensor], amax, rtol=1e-6)
        np.testing.assert_allclose(stats.minimum[t.tensor], lo, rtol=1e-6)
        np.testing.assert_allclose(stats.maximum[t.tensor], hi, rtol=1e-6)
    assert stats.num_samples == 6


def test_conv_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 9, 9] x) => (float[N, 5, 7, 7] y) {
            h = Relu (x)
            y = Conv <kernel_shape = [3, 3]> (h, w)
        }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w"))
    path = tmp_path / "conv.onnx"
    onnx.save(model, str(path))  # opset 13: ReduceMax takes axes as an attribute
    loaded, targets = targets_of(path)
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32) * np.array([1, 10, 100], np.float32)[:, None, None]
    stats = collect_channel_stats(loaded, targets, CalibrationData([{"x": x}]), progress=False)
    np.testing.assert_allclose(stats.amax["h"], np.maximum(x, 0).max(axis=(0, 2, 3)), rtol=1e-6)


def test_batch_size_shards_and_merge_agree(demo_dir, tmp_path):
    path = demo_dir / "tiny_llama.onnx"
    loaded, targets = targets_of(path)
    calib = demo_dir / "tiny_llama.calib.npz"
    one = collect_channel_stats(loaded, targets, CalibrationData(calib, batch_size=64), progress=False)
    small = collect_channel_stats(loaded, targets, CalibrationData(calib, batch_size=5), progress=False)
    ids = np.load(calib)["input_ids"]
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", input_ids=ids[:20])
    np.savez(shards / "b.npz", input_ids=ids[20:])
    folder = collect_channel_stats(loaded, targets, CalibrationData(shards), progress=False)
    a = collect_channel_stats(loaded, targets, CalibrationData(shards / "a.npz"), progress=False)
    b = collect_channel_stats(loaded, targets, CalibrationData(shards / "b.npz"), progress=False)
    a.save(tmp_path / "a.stats.npz")
    b.save(tmp_path / "b.stats.npz")
    merged = ChannelStats.merge_files([tmp_path / "a.stats.npz", tmp_path / "b.stats.npz"])
    for s in (small, folder, merged):
        assert s.num_samples == 64
        for k in one.amax:
            np.testing.assert_allclose(s.amax[k], one.amax[k], rtol=1e-6)
            np.testing.assert_allclose(s.minimum[k], one.minimum[k], rtol=1e-6)
            np.testing.assert_allclose(s.maximum[k], one.maximum[k], rtol=1e-6)


def test_format_1_statistics_still_load(tmp_path):
    """Abs-max-only files (format 1) load; the signed range is then unknown, and merging keeps it unknown."""
    import json

    meta = {"format": 1, "num_samples": 3, "tensors": ["x"], "channel_axis": [-1]}
    np.savez(tmp_path / "v1.npz", meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             t0=np.array([1.0, 2.0], np.float32))
    old = ChannelStats.load(tmp_path / "v1.npz")
    assert old.amax["x"].tolist() == [1.0, 2.0] and "x" not in old.minimum
    new = ChannelStats()
    new.update("x", np.array([3.0, 1.0]), -1, minimum=np.array([-3.0, 0.0]), maximum=np.array([1.0, 1.0]))
    merged = new.merge(old)
    assert merged.amax["x"].tolist() == [3.0, 2.0] and "x" not in merged.minimum


def test_stats_reuse_gives_identical_model(demo_dir, tmp_path):
    path = demo_dir / "tiny_llama.onnx"
    cfg = SmoothQuantConfig(quantization=None)
    first = run_smoothquant(path, tmp_path / "a.onnx", stats_out=tmp_path / "s.npz", config=cfg)
    again = run_smoothquant(path, tmp_path / "b.onnx", stats=[tmp_path / "s.npz"], config=cfg)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.stats.num_samples == again.stats.num_samples == 64


def test_external_data_model(demo_dir, tmp_path):
    """A model with external data: loaded lazily, calibrated in place, written with external data."""
    src = demo_dir / "tiny_llama.onnx"
    ext = tmp_path / "ext" / "model.onnx"
    written = save_model(onnx.load(str(src)), ext, None, external_data=True)
    assert [p.name for p in written] == ["model.onnx", "model.onnx.data"]
    loaded = load_model(ext)
    big = [t for t in loaded.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(big) >= 10 and all(not t.raw_data for t in big)  # nothing loaded yet
    np.savez(tmp_path / "ext" / "model.calib.npz", **text_like_feeds("tiny_llama", 3, samples=8))
    result = run_smoothquant(ext, tmp_path / "out" / "sq.onnx", config=SmoothQuantConfig(quantization=None))
    assert [p.name for p in result.written] == ["sq.onnx", "sq.onnx.data"]
    feeds = text_like_feeds("tiny_llama", 4)
    assert rel_err(run(src, feeds), run(result.written[0], feeds)) < 1e-5
    assert rel_err(run(src, feeds), run(ext, feeds)) == 0.0


def test_inline_model_is_read_lazily(demo_dir, tmp_path):
    """Large inline tensors stay in the .onnx file (external references to their own bytes there):
    same values, same graph, calibration reads them in place, and the output stays one inline file."""
    from onnx import numpy_helper

    from passes.ir.onnx_io import LAZY_INLINE_BYTES, TensorStore

    src = demo_dir / "tiny_llama.onnx"
    reference = onnx.load(str(src))
    loaded = load_model(src)
    big = [t.name for t in reference.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= LAZY_INLINE_BYTES]
    assert big and loaded.lazy_inline == frozenset(big)
    lazy = {t.name: t for t in loaded.proto.graph.initializer if t.name in loaded.lazy_inline}
    assert all(not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.values())
    store = TensorStore(loaded)
    for t in reference.graph.initializer:
        np.testing.assert_array_equal(store.array(t.name), numpy_helper.to_array(t))
    assert [t.name for t in loaded.proto.graph.initializer] == [t.name for t in reference.graph.initializer]
    del reference.graph.initializer[:]
    del loaded.proto.graph.initializer[:]
    assert loaded.proto == reference
    result = run_smoothquant(src, tmp_path / "sq.onnx", config=SmoothQuantConfig(quantization=None))
    assert [p.name for p in result.written] == ["sq.onnx"]
    out = onnx.load(str(tmp_path / "sq.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    feeds = text_like_feeds("tiny_llama", 4)
    assert rel_err(run(src, feeds), run(tmp_path / "sq.onnx", feeds)) < 1e-5


def test_large_inline_weights_go_to_ort_in_place(tmp_path):
    """Large inline initializers reach ORT as OrtValues behind external stubs; types OrtValue cannot
    hold (float8) stay inline; results are identical either way."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    from calibrators.minmax import INLINE_SPLIT_BYTES, inference_session, split_large_inline

    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 128)).astype(np.float32)  # 128 KB
    w8 = rng.normal(size=(256, 128)).astype(ml_dtypes.float8_e4m3fn)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w8"], ["w8f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["x", "w8f"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 128]) for n in ("y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w8, "w8")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert w.nbytes >= INLINE_SPLIT_BYTES
    light, big = split_large_inline(model)
    assert [t.name for t in big] == ["w"]
    stubs = {t.name: t for t in light.graph.initializer}
    assert stubs["w"].data_location == TensorProto.EXTERNAL and not stubs["w"].raw_data
    assert stubs["w8"].raw_data  # float8 stays inline
    x = rng.normal(size=(2, 256)).astype(np.float32)
    y, z = inference_session(model, tmp_path).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)
    np.testing.assert_allclose(z, x @ w8.astype(np.float32), rtol=1e-5)
    assert model.graph.initializer[0].raw_data  # the caller's model is untouched
