"""No input is ever touched: every output that resolves to a file the run reads, or that is not a
plain writable file, is refused before any work, with one line naming both; nothing is written."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import sha256
from passes.build_engine import main as build_main
from passes.smoothquant import main


@pytest.fixture
def work(demo_dir, tmp_path):
    """model.onnx with its weights in weights.bin, and its calibration data."""
    folder = tmp_path / "work"
    folder.mkdir()
    model = onnx.load(str(demo_dir / "tiny_llama.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    shutil.copy(demo_dir / "tiny_llama.calib.npz", folder / "model.calib.npz")
    return folder


def _state(folder) -> dict[str, str]:
    return {p.name: sha256(p) if p.is_file() else "" for p in sorted(folder.iterdir())}


def refused(work, capsys, args, *needles, command=main):
    before = _state(work)
    assert command([str(a) for a in args]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _state(work) == before  # no input changed, nothing written, no temporary left
    return lines[0]


def test_outputs_that_are_inputs_are_refused(work, capsys):
    m = work / "model.onnx"
    refused(work, capsys, [m, "--smooth-only", "-o", work / "weights.bin"], "weights.bin", "which this run reads")
    refused(work, capsys, [m, "--smooth-only", "--stats-out", m], "--stats-out file", "model.onnx")
    refused(work, capsys, [m, "--smooth-only", "--stats-out", work / "model.calib.npz"], "model.calib.npz")
    os.link(m, work / "alias.onnx")  # a hard link: another name, the same file
    refused(work, capsys, [m, "--smooth-only", "-o", work / "alias.onnx"], "which this run reads")


def test_an_output_whose_data_file_is_an_input_is_refused(work, capsys):
    """-o out.onnx writes out.onnx.data: refused where that is the input's external data."""
    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "out.onnx.data"
    (work / "weights.bin").rename(work / "out.onnx.data")
    onnx.save(model, str(work / "model.onnx"))
    refused(work, capsys, [work / "model.onnx", "--smooth-only", "-o", work / "out.onnx"],
            "output's external data", "out.onnx.data")


def test_outputs_that_are_not_plain_files_are_refused(work, capsys, tmp_path):
    m = work / "model.onnx"
    (work / "folder.onnx").mkdir()
    refused(work, capsys, [m, "--smooth-only", "-o", work / "folder.onnx"], "not a regular file")
    os.mkfifo(work / "fifo.onnx")
    refused(work, capsys, [m, "--smooth-only", "-o", work / "fifo.onnx"], "not a regular file")
    (tmp_path / "elsewhere.onnx").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere.onnx", work / "link.onnx")
    refused(work, capsys, [m, "--smooth-only", "-o", work / "link.onnx"], "symbolic link", "elsewhere.onnx")
    refused(work, capsys, [m, "--smooth-only", "-o", work / "model.calib.npz" / "x.onnx"], "is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(work, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(work, capsys, [work / "model.onnx", "--smooth-only", "-o", locked / "out.onnx"], "not writable")
    finally:
        locked.chmod(0o755)


def test_engine_outputs_are_checked_too(work, capsys):
    refused(work, capsys, [work / "model.onnx", "-o", work / "weights.bin", "--print-only", "--no-check"],
            "engine file", "which this run reads", command=build_main)
    refused(work, capsys, [work / "model.onnx", "-o", work / "e.plan", "--timing-cache", work / "e.plan",
                           "--print-only", "--no-check"], "same file", command=build_main)



@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_a_hugging_face_cache_layout_works(tmp_path, capsys, external):
    """snapshots/<rev>/model.onnx (and its data) are symlinks into blobs/: onnx's and ONNX Runtime's
    readers refuse linked files; the commands read through them."""
    from passes.check_trt import main as check_main
    from passes.evaluate import main as evaluate_main

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(128, 128)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 128).astype(np.float32), "g"),
             numpy_helper.from_array(np.zeros(128, np.float32), "b")]
    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln"),
                               helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 128])], inits)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if external:
        onnx.save(model, str(blobs / "m.onnx"), save_as_external_data=True, location="model.onnx_data",
                  size_threshold=1024)
        (blobs / "model.onnx_data").rename(blobs / "d4t4")
        os.symlink("../../blobs/d4t4", snap / "model.onnx_data")
    else:
        onnx.save(model, str(blobs / "m.onnx"))
    (blobs / "m.onnx").rename(blobs / "m0d3l")
    os.symlink("../../blobs/m0d3l", snap / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(16, 128)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main([str(snap / "model.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--fast", "-q"]) == 0
    assert check_main([str(snap / "model.onnx"), "-q"]) == 0
    assert evaluate_main([str(snap / "model.onnx"), str(out), "--data", str(tmp_path / "calib.npz")]) == 0
    assert "max_rel_err" in capsys.readouterr().out


def _tiny_add(path, op_type: str = "Add", const=np.float32(1.0)):
    graph = helper.make_graph([helper.make_node(op_type, ["x", "c"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.asarray(const), "c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_found_by_the_fuzzer_are_one_line(work, capsys):
    """A string that is not UTF-8 in the checker's message (it raised UnicodeDecodeError), and a type
    mismatch only ONNX Runtime's session creation notices (it was a traceback)."""
    _tiny_add(work / "bad.onnx", op_type="Zz")
    raw = (work / "bad.onnx").read_bytes().replace(b"Zz", b"\xff\xfe", 1)
    (work / "bad.onnx").write_bytes(raw)
    refused(work, capsys, [work / "bad.onnx", "--smooth-only", "-o", work / "out.onnx"], "not UTF-8")
    _tiny_add(work / "typed.onnx", const=np.int64(1))
    np.savez(work / "typed.calib.npz", x=np.ones((2, 4), np.float32))
    refused(work, capsys, [work / "typed.onnx", "-o", work / "out.onnx"], "ONNX Runtime cannot load", "(add)")
