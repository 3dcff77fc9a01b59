"""Calibration cost on the real models: our calibrator vs plain ORT inference vs ORT's MinMax calibrator.

    python -m bench.calib_cost [--models minilm smollm2] [--json OUT.json]

Each row runs in a fresh process over the same calibration set (``models.export`` defaults:
MiniLM 128 x 128 tokens, SmolLM2 32 x 256), batch 8 (SmolLM2: 4), and reports wall time and
peak RSS (VmHWM):

- ``inference``: a plain ONNX Runtime session run over the data (outputs fetched);
- ``ours``: :func:`calibrators.collect_channel_stats` on every MatMul/Gemm input (per-channel
  min and max computed in the graph, external data read in place);
- ``ort_minmax``: ``onnxruntime.quantization.calibrate`` MinMax calibrator on MatMul/Gemm
  (``create_calibrator`` + ``collect_data`` + ``compute_data``), the same tensors, per tensor.

Ratios are to ``inference`` of the same model, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = {"minilm": 8, "smollm2": 4}


def child(mode: str, model_name: str, out_dir: str) -> dict:
    from bench.calib_memory import peak_rss_kb  # noqa: PLC0415
    from calibrators import CalibrationData, collect_channel_stats  # noqa: PLC0415
    from models.export import export  # noqa: PLC0415

    model = export(model_name, Path(out_dir))
    data = model.with_name(f"{model_name}.calib.npz")
    batch = BATCH[model_name]
    start = time.perf_counter()
    if mode == "inference":
        import onnxruntime as ort  # noqa: PLC0415

        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        for feed in CalibrationData(data, batch).batches():
            session.run(None, feed)
    elif mode == "ours":
        from passes.ir.graph import GraphView  # noqa: PLC0415
        from passes.linear import find_linear_ops  # noqa: PLC0415
        from passes.ir.onnx_io import TensorStore, load_model  # noqa: PLC0415
        from passes.smooth import stat_targets  # noqa: PLC0415

        loaded = load_model(model)
        view = GraphView(loaded.proto.graph, TensorStore(loaded))
        collect_channel_stats(loaded, stat_targets(view, find_linear_ops(view)[0]), CalibrationData(data, batch),
                              progress=False)
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator  # noqa: PLC0415

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(CalibrationData(data, batch).batches())

            def get_next(self):
                return next(self.it, None)

        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(str(model), ["MatMul", "Gemm"], augmented_model_path=f"{tmp}/aug.onnx",
                                           calibrate_method=CalibrationMethod.MinMax,
                                           use_external_data_format=model_name == "smollm2")
            calibrator.collect_data(Reader())
            calibrator.compute_data()
    seconds = time.perf_counter() - start
    return {"model": model_name, "mode": mode, "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def measure(mode: str, model_name: str, out_dir: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.calib_cost", "--child", mode, "--models", model_name,
                           "--out", out_dir], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"model": model_name, "mode": mode, "error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--out", default="models/real")
    p.add_argument("--json")
    p.add_argument("--child", choices=["inference", "ours", "ort_minmax"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.models[0], args.out)))
        return 0
    rows = []
    for name in args.models:
        base = None
        for mode in ("inference", "ours", "ort_minmax"):
            row = measure(mode, name, args.out)
            if mode == "inference":
                base = row
            if "error" not in row and base and "error" not in base:
                row["time_vs_inference"] = round(row["seconds"] / base["seconds"], 2)
                row["rss_vs_inference"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 2)
            rows.append(row)
            print(f"done: {name} {mode}", flush=True)
    print(f"\n{'model':<8} {'mode':<11} {'seconds':>8} {'peak RSS MB':>12} {'time x':>7} {'RSS x':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<8} {r['mode']:<11} failed: {r['error']}")
            continue
        print(f"{r['model']:<8} {r['mode']:<11} {r['seconds']:>8} {r['peak_rss_mb']:>12} "
              f"{r.get('time_vs_inference', 1.0):>6}x {r.get('rss_vs_inference', 1.0):>5}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
