"""Outputs are committed atomically and validated first: a kill at any moment leaves the old pair, the
new pair, or no model; an invalid output never replaces anything; the umask decides permissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.ir.atomic import terminate_as_interrupt
from passes.ir.errors import SmoothQuantError
from passes.ir.onnx_io import load_model, save_model
from passes.validate import validate_written_model

REPO = Path(__file__).resolve().parents[1]
WRITER = """
import sys, numpy as np
from onnx import TensorProto, helper, numpy_helper
from passes.ir.onnx_io import save_model
out = sys.argv[1]
for gen in range(1, 10**6):
    w = numpy_helper.from_array(np.full((128, 128), gen, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {"gen": str(gen)})
    save_model(model, out, None, external_data=True)
    print(gen, flush=True)
"""


def tiny(value: float, op: str = "MatMul", rows: int = 128) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((rows, 128), value, np.float32), "w")
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_kill_at_any_moment_leaves_a_whole_pair_or_none(tmp_path):
    """A writer rewrites model.onnx + model.onnx.data in a loop and is SIGKILLed at random moments:
    whenever model.onnx exists it loads with its own data (the weight equals the generation in its
    metadata). The next write removes the killed runs' temporary folders."""
    out = tmp_path / "model.onnx"
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        child.stdout.readline()  # at least one pair written
        time.sleep(float(rng.uniform(0.0, 0.3)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if out.exists():
            model = onnx.load(str(out))
            gen = float(dict((p.key, p.value) for p in model.metadata_props)["gen"])
            w = numpy_helper.to_array(model.graph.initializer[0])
            assert np.all(w == gen), f"model of generation {gen} beside data of {w.flat[0]}"
            seen.add("whole")
        else:
            seen.add("absent")
    save_model(tiny(1.0), out, None, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert "whole" in seen


def test_an_invalid_output_replaces_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    save_model(tiny(1.0), out, None, validate=validate_written_model)
    before = out.read_bytes()
    with pytest.raises(SmoothQuantError, match="fails ONNX's checker: No Op registered for NoSuchOp"):
        save_model(tiny(2.0, op="NoSuchOp"), out, None, validate=validate_written_model)
    with pytest.raises(SmoothQuantError, match="ONNX Runtime cannot load the written model"):
        save_model(tiny(2.0, rows=64), out, None, validate=validate_written_model)  # [1, 128] @ [64, 128]
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        written = save_model(tiny(1.0), tmp_path / "m.onnx", None, external_data=True)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in written] == [mode, mode]


def test_sigterm_unwinds_like_ctrl_c():
    undo = terminate_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("field, value, needle", [
    ("length", "12", "is not its size"),
    ("offset", "-4", "not a whole number"),
    ("length", "ten", "not a whole number"),
    ("colour", "red", "unknown external-data fields"),
])
def test_malformed_external_data_is_one_line(tmp_path, field, value, needle):
    save_model(tiny(1.0), tmp_path / "m.onnx", None, external_data=True)
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    match = [e for e in entries if e.key == field]
    if match:
        match[0].value = value
    else:
        entries.add(key=field, value=value)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(SmoothQuantError, match=needle) as e:
        load_model(tmp_path / "m.onnx")
    assert "tensor 'w'" in str(e.value) and "\n" not in str(e.value)
