"""The CLI end to end: success paths and every kind of bad input (one-line error, no output)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import sha256
from passes.smoothquant import main


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "passes.smoothquant", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def work(demo_dir, tmp_path):
    """A private folder with a copy of the demo llama and its calibration data (bad inputs go beside it)."""
    folder = tmp_path / "work"
    folder.mkdir()
    for suffix in (".onnx", ".calib.npz"):
        shutil.copy(demo_dir / f"tiny_llama{suffix}", folder / f"model{suffix}")
    return folder


def outputs_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("model.onnx", "model.calib.npz"))


def test_smooth_only_defaults(work):
    before = sha256(work / "model.onnx")
    r = cli(work / "model.onnx", "--smooth-only", "--alpha", "0.7", "--stats-out", work / "s.npz")
    assert r.returncode == 0, r.stderr
    assert "7 folded" not in r.stdout and "smoothing groups: 9 found; 5 folded into norm, 2 folded into linear" in r.stdout
    assert outputs_in(work) == ["model.smooth.onnx", "s.npz"]
    assert sha256(work / "model.onnx") == before  # the input is never modified
    r = cli(work / "model.onnx", "--smooth-only", "--stats", work / "s.npz", "-o", work / "again.onnx", "-q")
    assert r.returncode == 0, r.stderr
    assert (work / "again.onnx").read_bytes() != (work / "model.smooth.onnx").read_bytes()  # alpha 0.5 vs 0.7


def test_log_levels_one_stream_in_order(work, capsys):
    """Default: notes, then one line per stage and a pointer to -v; -v: every group too; -q: the
    written file only. All on stdout, notes first (errors alone go to stderr)."""
    base = [str(work / "model.onnx"), "--fast", "--quantize-tied"]
    runs = {}
    for flags in ([], ["-v"], ["-q"], ["--log-level", "debug", "-q"]):
        assert main(base + ["-o", str(work / "o.onnx")] + flags) == 0
        captured = capsys.readouterr()
        assert captured.err == "" or "error" not in captured.err
        runs[" ".join(flags)] = captured.out.splitlines()
        (work / "o.onnx").unlink()
    default, verbose, quiet = runs[""], runs["-v"], runs["-q"]
    assert default[0].startswith("smoothing groups: 9 found") and default[-1].startswith("wrote ")
    assert any(line.startswith("(") and "-v)" in line for line in default) and len(default) <= 5, default
    assert len(verbose) > len(default) + 5 and any(line.startswith("  norm") for line in verbose)
    assert quiet == [default[-1]] and runs["--log-level debug -q"] == verbose
    noted = main(base + ["-o", str(work / "n.onnx"), "--exclude", "nomatch"]) == 0 and capsys.readouterr().out
    lines = noted.splitlines()
    assert lines[0].startswith("note: --exclude 'nomatch' matches no linear op"), lines


def test_main_is_callable_in_process(work, capsys):
    assert main([str(work / "model.onnx"), "--smooth-only", "-q", "-o", str(work / "x.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out


def expect_error(work, args, *needles):
    r = cli(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert outputs_in(work) == [], "a failed run left files behind"
    assert not any(p.name.startswith(".") for p in work.iterdir()), "temporary files left behind"


def test_not_onnx(work):
    (work / "model.onnx").write_text("this is not a model\n" * 10)
    expect_error(work, [work / "model.onnx", "--smooth-only"], "model.onnx", "not a valid ONNX model")


def test_truncated(work):
    data = (work / "model.onnx").read_bytes()
    (work / "model.onnx").write_bytes(data[: len(data) // 2])
    expect_error(work, [work / "model.onnx", "--smooth-only"], "model.onnx")


def test_missing_file(work):
    expect_error(work, [work / "nope.onnx", "--smooth-only"], "nope.onnx", "no such file")


def test_calibration_for_wrong_model(work, demo_dir):
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", demo_dir / "tiny_bert.calib.npz"],
                 "tiny_bert.calib.npz", "array 'attention_mask' matches no model input")


def test_wrong_dtype_and_rank(work):
    np.savez(work.parent / "bad.npz", input_ids=np.zeros((4, 8), np.int32))
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", work.parent / "bad.npz"],
                 "'input_ids'", "int32", "int64")
    (work.parent / "bad.npz").unlink()
    np.savez(work.parent / "bad.npz", input_ids=np.zeros((4, 8, 2), np.int64))
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", work.parent / "bad.npz"], "'input_ids'", "rank 3")
    (work.parent / "bad.npz").unlink()
    np.savez(work.parent / "bad.npz", tokens=np.zeros((4, 8), np.int64))
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", work.parent / "bad.npz"],
                 "no array for model input 'input_ids'")
    (work.parent / "bad.npz").unlink()


def test_empty_calibration_set(work):
    np.savez(work.parent / "empty.npz", input_ids=np.zeros((0, 8), np.int64))
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", work.parent / "empty.npz"], "empty")
    (work.parent / "empty.npz").unlink()
    (work.parent / "empty").mkdir()
    expect_error(work, [work / "model.onnx", "--smooth-only", "--calib", work.parent / "empty"], "holds no .npz")
    (work.parent / "empty").rmdir()


def test_no_calibration_data(work, tmp_path):
    assert main([str(work / "model.onnx"), "--smooth-only", "-q", "--stats-out", str(tmp_path / "s.npz"),
                 "-o", str(tmp_path / "s.onnx")]) == 0
    (work / "model.calib.npz").unlink()
    expect_error(work, [work / "model.onnx", "--smooth-only"], "no calibration data", "--calib")
    # options that run the model again need the data itself, not only its statistics
    expect_error(work, [work / "model.onnx", "--stats", tmp_path / "s.npz", "--weight-rounding", "gptq"],
                 "statistics alone (--stats) do not replace", "--calib")


def test_stats_from_another_model(work, demo_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    assert cli(demo_dir / "tiny_bert.onnx", "--smooth-only", "--stats-out", other / "bert.npz",
               "-o", other / "b.onnx", "-q").returncode == 0
    expect_error(work, [work / "model.onnx", "--smooth-only", "--stats", other / "bert.npz"],
                 "statistics have no entry for activation")


def test_output_may_not_overwrite_input(work):
    expect_error(work, [work / "model.onnx", "--smooth-only", "-o", work / "model.onnx"], "would overwrite")


def test_bad_alpha(work):
    expect_error(work, [work / "model.onnx", "--smooth-only", "--alpha", "1.5"], "alpha")


def test_no_smoothable_pattern_writes_unchanged_copy(tmp_path):
    import onnx

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }""")
    onnx.save(model, str(tmp_path / "relu.onnx"))
    r = cli(tmp_path / "relu.onnx", "--smooth-only")
    assert r.returncode == 0, r.stderr
    assert "nothing to smooth" in r.stdout
    assert onnx.load(str(tmp_path / "relu.smooth.onnx")).graph == model.graph


def test_missing_and_truncated_external_data(demo_dir, tmp_path):
    import onnx

    from passes.ir.onnx_io import save_model

    folder = tmp_path / "ext"
    save_model(onnx.load(str(demo_dir / "tiny_llama.onnx")), folder / "model.onnx", None, external_data=True)
    data = folder / "model.onnx.data"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    r = cli(folder / "model.onnx", "--smooth-only", "--calib", demo_dir / "tiny_llama.calib.npz")
    assert r.returncode == 1 and "model.onnx" in r.stderr and ("truncated" in r.stderr or "data" in r.stderr), r.stderr
    data.unlink()
    r = cli(folder / "model.onnx", "--smooth-only", "--calib", demo_dir / "tiny_llama.calib.npz")
    assert r.returncode == 1 and "model.onnx.data" in r.stderr, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]
