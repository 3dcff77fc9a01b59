"""No input is ever touched: every output that resolves to a file the run reads, or that is not a
plain writable file, is refused before any work, with one line naming both; nothing is written."""

from __future__ import annotations

import os
import shutil

import onnx
import pytest

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

