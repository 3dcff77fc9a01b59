"""all-MiniLM-L6-v2: our INT8 against ONNX Runtime's quantizers and NNCF, side by side in one run.

    python -m bench.peers_ort [--out models/real] [--rounds 20] [--nncf-venv DIR] [--json OUT.json]

Same model file, same calibration set (128 handbook paragraphs) and held-out set (256). Each
tool quantizes in a fresh process (wall time and peak RSS of that process); then every
candidate is evaluated here: cosine of mean-pooled sentence embeddings vs fp32, and ORT CPU
latency of one 8 x 128 batch timed alternately with fp32 (speed-up = fp32 / candidate).

Peers (onnxruntime.quantization, the version installed beside this package):
``quantize_static`` QDQ per-channel symmetric int8 weights, MatMul only, with int8 symmetric
or uint8 asymmetric activations (MinMax calibration); ``quantize_dynamic`` int8. In their own
virtual environments (created on first use, ``bench/peer_scripts/``): ORT ``quantize_static``
u8/s8 with its ``SmoothQuant`` option (neural-compressor 3.7.1, numpy<2: ``--inc-venv``), and NNCF
3.4.0 (``nncf.quantize``, ``model_type=TRANSFORMER``, with and without its SmoothQuant:
``--nncf-venv``), and NVIDIA ModelOpt (``modelopt.onnx.quantization.quantize``, int8 and fp8, CPU
calibration, non-quantized parts fp32: ``--modelopt-venv``). FP8 has no CPU kernels in ONNX
Runtime: FP8 rows are emulated there, so their speed-up says nothing about a GPU.
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
TOOLS = ["ours int8 α auto --target onnxruntime", "ours int8 α=0.9 (TensorRT placement)",
         "ort quantize_static s8/s8 per-channel", "ort quantize_static u8/s8 per-channel", "ort quantize_dynamic",
         "ort quantize_static u8/s8 + its SmoothQuant α=0.5", "nncf TRANSFORMER (its SmoothQuant)",
         "nncf TRANSFORMER, SmoothQuant off", "modelopt int8", "ours fp8 no smoothing (TensorRT placement)",
         "modelopt fp8"]
NNCF = "nncf==3.4.0"
MODELOPT = ("nvidia-modelopt[onnx]==0.47.0",)
INC = ("neural-compressor==3.7.1", "numpy<2", "six")  # 3.8+ removed the module ORT's SmoothQuant imports


def venv_python(venv: Path, packages) -> Path:
    """A peer's own environment (its python), created on first use, with our onnxruntime version."""
    python = venv / "bin" / "python"
    if not python.exists():
        import onnxruntime  # noqa: PLC0415

        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages, "onnx",
                        f"onnxruntime=={onnxruntime.__version__}"], check=True)
    return python


def run_tool(tool: str, args, model: Path, target: Path) -> subprocess.CompletedProcess:
    calib = str(model.with_name("minilm.calib.npz"))
    if tool.startswith("nncf"):
        cmd = [str(venv_python(Path(args.nncf_venv), [NNCF])), str(ROOT / "bench/peer_scripts/nncf_quantize.py"),
               str(model), calib, str(target)]
        return subprocess.run(cmd + (["--no-smooth-quant"] if "off" in tool else []), capture_output=True, text=True)
    if tool.startswith("modelopt"):
        cmd = [str(venv_python(Path(args.modelopt_venv), MODELOPT)), str(ROOT / "bench/peer_scripts/modelopt_quantize.py"),
               str(model), calib, str(target), "--mode", tool.split()[1]]
        return subprocess.run(cmd, capture_output=True, text=True)
    if "its SmoothQuant" in tool:
        cmd = [str(venv_python(Path(args.inc_venv), INC)), str(ROOT / "bench/peer_scripts/ort_smoothquant.py"),
               str(model), calib, str(target), "--alpha", "0.5"]
        return subprocess.run(cmd, capture_output=True, text=True)
    return subprocess.run([sys.executable, "-m", "bench.peers_ort", "--child", tool, "--out", args.out,
                           "--target", str(target)], capture_output=True, text=True, cwd=ROOT)


def quantize(tool: str, model: Path, calib: Path, out: Path) -> None:
    from calibrators import CalibrationData  # noqa: PLC0415

    if tool.startswith("ours"):
        from bench.minilm import GRID  # noqa: PLC0415
        from passes import CalibrationConfig, QuantizationConfig, SmoothingConfig, SmoothQuantConfig, run_smoothquant  # noqa: PLC0415
        from passes.config import Precision, Target  # noqa: PLC0415

        if "auto" in tool:
            cfg = SmoothQuantConfig(SmoothingConfig(alpha_grid=GRID), CalibrationConfig(progress=False),
                                    QuantizationConfig(target=Target.ONNXRUNTIME))
        elif "fp8" in tool:
            cfg = SmoothQuantConfig(SmoothingConfig(enabled=False), CalibrationConfig(progress=False),
                                    QuantizationConfig(precision=Precision.FP8))
        else:
            cfg = SmoothQuantConfig(SmoothingConfig(0.9), CalibrationConfig(progress=False), QuantizationConfig())
        run_smoothquant(model, out, calib=calib, config=cfg)
        return
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_dynamic, quantize_static)

    if tool == "ort quantize_dynamic":
        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
        return

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(CalibrationData(calib, 8).batches())

        def get_next(self):
            return next(self.it, None)

    s8 = "s8/s8" in tool
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if s8 else QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": s8, "WeightSymmetric": True})


def child(tool: str, out_dir: str, target: str) -> dict:
    from bench.calib_memory import peak_rss_kb  # noqa: PLC0415
    from models.export import export  # noqa: PLC0415

    model = export("minilm", Path(out_dir))
    start = time.perf_counter()
    quantize(tool, model, model.with_name("minilm.calib.npz"), Path(target))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/real")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json")
    p.add_argument("--nncf-venv", default=str(ROOT / ".cache" / "venv-nncf"), help="NNCF's virtual environment")
    p.add_argument("--inc-venv", default=str(ROOT / ".cache" / "venv-inc"),
                   help="environment for ORT's SmoothQuant (neural-compressor 3.7.1, numpy<2)")
    p.add_argument("--modelopt-venv", default=str(ROOT / ".cache" / "venv-modelopt"), help="ModelOpt's virtual environment")
    p.add_argument("--only", help="run only tools whose label contains this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.out, args.target)))
        return 0
    import onnxruntime  # noqa: PLC0415

    from models.export import export  # noqa: PLC0415
    from passes.evaluate import Task, evaluate  # noqa: PLC0415

    model = export("minilm", Path(args.out))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tool in enumerate(TOOLS):
            if args.only and args.only not in tool:
                continue
            target = Path(tmp) / f"q{i}.onnx"
            done = run_tool(tool, args, model, target)
            if done.returncode != 0:
                rows.append({"tool": tool, "error": done.stderr.strip().splitlines()[-1][:200]})
                continue
            out = done.stdout.strip()
            cost = json.loads(out[out.rindex("{"):])  # peers may print progress bars before the JSON line
            cost.pop("nncf", None), cost.pop("modelopt", None)
            m = evaluate(model, target, model.with_name("minilm.eval.npz"), task=Task.ENCODER, batch_size=8,
                         latency_rounds=args.rounds).metrics
            rows.append({"tool": tool, **cost, "cos_mean": round(m["cosine_mean"], 5),
                         "cos_min": round(m["cosine_min"], 4), "speedup": round(m["speedup"], 2)})
            print(f"done: {tool}", flush=True)
    print(f"\nall-MiniLM-L6-v2, onnxruntime {onnxruntime.__version__}, {NNCF}, {MODELOPT[0]}, 256 held-out paragraphs")
    print(f"{'tool':<40} {'quant s':>7} {'peak RSS MB':>11} {'cos mean':>9} {'cos min':>8} {'speed-up':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['tool']:<40} failed: {r['error']}")
            continue
        print(f"{r['tool']:<40} {r['seconds']:>7} {r['peak_rss_mb']:>11} {r['cos_mean']:>9.5f} {r['cos_min']:>8.4f} "
              f"{r['speedup']:>7}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
