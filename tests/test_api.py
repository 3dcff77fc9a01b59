"""The Python API inside an export pipeline: a ModelProto in (never modified), a model that stands
alone out with write=False, enum options as strings, clear messages for the usual slips."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import passes
from conftest import run
from passes import QuantizationConfig, SmoothingConfig, SmoothQuantConfig, SmoothQuantError, run_smoothquant
from passes.config import Precision
from test_quant_options import QUIET


def _feeds(demo_dir):
    with np.load(demo_dir / "tiny_llama.calib.npz") as z:
        return [{k: z[k][i:i + 2] for k in z.files} for i in (0, 2)]


CONFIG = SmoothQuantConfig(SmoothingConfig(0.5), QUIET, QuantizationConfig(weight_rounding="nearest"))


def test_a_model_proto_in_a_standalone_model_out(demo_dir, tmp_path):
    proto = onnx.load(str(demo_dir / "tiny_llama.onnx"))
    before = proto.SerializeToString()
    kept = run_smoothquant(proto, calib=_feeds(demo_dir), config=CONFIG, write=False)
    assert proto.SerializeToString() == before  # the caller's proto is untouched
    written = run_smoothquant(proto, tmp_path / "q.onnx", calib=_feeds(demo_dir), config=CONFIG)
    feed = _feeds(demo_dir)[0]
    from_bytes = ort.InferenceSession(kept.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = from_bytes.run(None, feed)
    want = run(tmp_path / "q.onnx", feed)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert written.written == [tmp_path / "q.onnx"]


def test_an_external_data_proto_with_its_folder(demo_dir, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(onnx.load(str(demo_dir / "tiny_llama.onnx")), str(source / "m.onnx"), save_as_external_data=True,
              location="m.bin", size_threshold=0)
    proto = onnx.load(str(source / "m.onnx"), load_external_data=False)
    with pytest.raises(SmoothQuantError, match="points at external data 'm.bin', which does not exist"):
        run_smoothquant(proto, calib=_feeds(demo_dir), config=CONFIG, write=False, base_dir=tmp_path)
    result = run_smoothquant(proto, calib=_feeds(demo_dir), config=CONFIG, write=False, base_dir=source)
    assert not any(t.external_data for t in result.model.graph.initializer)  # stands alone
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(SmoothQuantError, match="needs an output path"):
        run_smoothquant(proto, calib=_feeds(demo_dir), config=CONFIG, base_dir=source)


def test_enum_options_as_strings():
    assert QuantizationConfig(precision="fp8", target="onnxruntime", granularity="per-token").precision is Precision.FP8
    assert QuantizationConfig(precision="FP8").precision is Precision.FP8
    with pytest.raises(SmoothQuantError, match=r"QuantizationConfig.precision: 'fp4' is not one of \['int8', 'fp8'\]"):
        QuantizationConfig(precision="fp4")
    with pytest.raises(SmoothQuantError, match="SmoothingConfig.unfoldable"):
        SmoothingConfig(unfoldable=3)


def test_one_feed_dict_says_to_pass_a_list(demo_dir):
    with pytest.raises(SmoothQuantError, match=r"one feed dict: pass a list of them \(calib=\[feed\]\)"):
        run_smoothquant(demo_dir / "tiny_llama.onnx", calib=_feeds(demo_dir)[0], config=CONFIG, write=False)


def test_version_and_names():
    assert passes.__version__ and passes.__version__[0].isdigit()
    assert {"run_smoothquant", "SmoothQuantConfig", "Precision"} <= set(dir(passes))
