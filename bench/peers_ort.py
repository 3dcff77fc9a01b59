"""Our W8A8 against ONNX Runtime's quantizers, NNCF and ModelOpt, side by side in one run.

    python -m bench.peers_ort [--model minilm|smollm2] [--out models/real] [--rounds N] [--only TEXT ...] [--json OUT.json]

Same model file, same calibration set and held-out set for every tool (``models.export``:
all-MiniLM-L6-v2 with 128 calibration / 256 held-out handbook paragraphs; SmolLM2-135M with
32 x 256 / 16 x 256 tokens). Each tool quantizes in a fresh process (wall time and peak RSS of
that process); then every candidate is evaluated here with ``passes.evaluate``: MiniLM, the
cosine of mean-pooled sentence embeddings vs fp32; SmolLM2, perplexity and next-token top-1
agreement with fp32. Latency: ORT CPU on one batch (MiniLM 8 x 128, SmolLM2 4 x 256), timed
alternately with fp32 (speed-up = fp32 / candidate).

Peers (onnxruntime.quantization, the version installed beside this package):
``quantize_static`` QDQ per-channel symmetric int8 weights, MatMul only, with int8 symmetric
or uint8 asymmetric activations (MinMax calibration); ``quantize_dynamic`` int8. In their own
virtual environments (created on first use, ``bench/peer_scripts/``): ORT ``quantize_static``
u8/s8 with its ``SmoothQuant`` option (neural-compressor 3.7.1, numpy<2: ``--inc-venv``), NNCF
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
# Our rows: settings of the per-model benches (same configurations, same labels after "ours ").
OURS = {"minilm": ("int8 α auto, --target onnxruntime, gptq", "int8 α auto, --target onnxruntime, gptq, --unfoldable mul",
                   "int8 no smoothing, --target onnxruntime, gptq",
                   "int8 α=0.9", "fp8 α auto, gptq"),
        "smollm2": ("int8 per-tensor, α=0.8, --target onnxruntime, gptq",
                    "int8 per-tensor, α=0.8, --target onnxruntime, gptq, --quantize-tied",
                    "int8 per-tensor, α=0.8, 8 FP layers",
                    "int8 per-token, α=0.5", "fp8 per-tensor, no smoothing, gptq", "fp8 per-token, α=0.5, gptq")}


def peers(model: str) -> list[str]:
    # ModelOpt's default (entropy) calibration fails on SmolLM2 ("Too many bins for data range"): max there.
    modelopt = " (max calibration)" if model == "smollm2" else ""
    return ["ort quantize_static s8/s8 per-channel", "ort quantize_static u8/s8 per-channel", "ort quantize_dynamic",
            "ort quantize_static u8/s8 + its SmoothQuant α=0.5", "nncf TRANSFORMER (its SmoothQuant)",
            "nncf TRANSFORMER, SmoothQuant off", f"modelopt int8{modelopt}", f"modelopt fp8{modelopt}"]


def ours(model: str) -> dict:
    """Our rows per model: "ours <label>" -> the SmoothQuantConfig of ``bench.<model>``'s setting."""
    import importlib  # noqa: PLC0415

    settings = dict(importlib.import_module(f"bench.{model}").settings())
    return {f"ours {label}": settings[label] for label in OURS[model]}


BATCH = {"minilm": 8, "smollm2": 4}
ROUNDS = {"minilm": 20, "smollm2": 5}
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
    calib = str(model.with_name(f"{args.model}.calib.npz"))
    if tool.startswith("nncf"):
        cmd = [str(venv_python(Path(args.nncf_venv), [NNCF])), str(ROOT / "bench/peer_scripts/nncf_quantize.py"),
               str(model), calib, str(target)]
        return subprocess.run(cmd + (["--no-smooth-quant"] if "off" in tool else []), capture_output=True, text=True)
    if tool.startswith("modelopt"):
        cmd = [str(venv_python(Path(args.modelopt_venv), MODELOPT)), str(ROOT / "bench/peer_scripts/modelopt_quantize.py"),
               str(model), calib, str(target), "--mode", tool.split()[1]]
        return subprocess.run(cmd + (["--method", "max"] if "max calibration" in tool else []),
                              capture_output=True, text=True)
    if "its SmoothQuant" in tool:
        cmd = [str(venv_python(Path(args.inc_venv), INC)), str(ROOT / "bench/peer_scripts/ort_smoothquant.py"),
               str(model), calib, str(target), "--alpha", "0.5"]
        return subprocess.run(cmd, capture_output=True, text=True)
    return subprocess.run([sys.executable, "-m", "bench.peers_ort", "--child", tool, "--model", args.model,
                           "--out", args.out, "--target", str(target)], capture_output=True, text=True, cwd=ROOT)


def quantize(tool: str, model_name: str, model: Path, calib: Path, out: Path) -> None:
    from calibrators import CalibrationData  # noqa: PLC0415

    if tool.startswith("ours"):
        from passes import run_smoothquant  # noqa: PLC0415

        run_smoothquant(model, out, calib=calib, config=ours(model_name)[tool])
        return
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_dynamic, quantize_static)

    if tool == "ort quantize_dynamic":
        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
        return

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(CalibrationData(calib, BATCH[model_name]).batches())

        def get_next(self):
            return next(self.it, None)

    s8 = "s8/s8" in tool
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if s8 else QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": s8, "WeightSymmetric": True})


def child(tool: str, model_name: str, out_dir: str, target: str) -> dict:
    from bench.calib_memory import peak_rss_kb  # noqa: PLC0415
    from models.export import export  # noqa: PLC0415

    model = export(model_name, Path(out_dir))
    start = time.perf_counter()
    quantize(tool, model_name, model, model.with_name(f"{model_name}.calib.npz"), Path(target))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(BATCH), default="minilm")
    p.add_argument("--out", default="models/real")
    p.add_argument("--rounds", type=int, help="latency rounds (default: MiniLM 20, SmolLM2 5)")
    p.add_argument("--json")
    p.add_argument("--nncf-venv", default=str(ROOT / ".cache" / "venv-nncf"), help="NNCF's virtual environment")
    p.add_argument("--inc-venv", default=str(ROOT / ".cache" / "venv-inc"),
                   help="environment for ORT's SmoothQuant (neural-compressor 3.7.1, numpy<2)")
    p.add_argument("--modelopt-venv", default=str(ROOT / ".cache" / "venv-modelopt"), help="ModelOpt's virtual environment")
    p.add_argument("--only", action="append", help="run only tools whose label contains this (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.out, args.target)))
        return 0
    import onnxruntime  # noqa: PLC0415

    from models.export import export  # noqa: PLC0415
    from passes.evaluate import Task, evaluate  # noqa: PLC0415

    model = export(args.model, Path(args.out))
    task = Task.ENCODER if args.model == "minilm" else Task.CAUSAL_LM
    rounds = args.rounds if args.rounds is not None else ROUNDS[args.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tool in enumerate([*ours(args.model), *peers(args.model)]):
            if args.only and not any(text in tool for text in args.only):
                continue
            target = Path(tmp) / f"q{i}.onnx"
            done = run_tool(tool, args, model, target)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["(no output)"]
                rows.append({"tool": tool, "error": lines[-1][:200]})
                print(f"failed: {tool}: {lines[-1][:200]}", flush=True)
                continue
            out = done.stdout.strip()
            cost = json.loads(out[out.rindex("{"):])  # peers may print progress bars before the JSON line
            for key in ("nncf", "modelopt"):
                cost.pop(key, None)
            m = evaluate(model, target, model.with_name(f"{args.model}.eval.npz"), task=task,
                         batch_size=BATCH[args.model], latency_rounds=rounds).metrics
            row = {"tool": tool, **cost, "speedup": round(m["speedup"], 2)}
            if task is Task.ENCODER:
                row.update(cos_mean=round(m["cosine_mean"], 5), cos_min=round(m["cosine_min"], 4))
            else:
                row.update(ppl_fp32=round(m["perplexity_ref"], 3), ppl=round(m["perplexity_cand"], 3),
                           increase_pct=round(m["perplexity_increase_pct"], 2), top1=round(m["top1_agreement"], 4))
            rows.append(row)
            print(f"done: {tool}", flush=True)
            for f in Path(tmp).iterdir():  # SmolLM2 candidates are ~0.2-0.5 GB each
                f.unlink()
    held = "256 held-out paragraphs" if task is Task.ENCODER else "16 x 256 held-out tokens"
    print(f"\n{args.model}, onnxruntime {onnxruntime.__version__}, {NNCF}, {MODELOPT[0]}, {held}")
    metric = "cos mean  cos min" if task is Task.ENCODER else "     ppl  vs fp32  top-1"
    print(f"{'tool':<52} {'quant s':>7} {'peak RSS MB':>11} {metric} {'speed-up':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['tool']:<52} failed: {r['error']}")
            continue
        values = (f"{r['cos_mean']:>8.5f} {r['cos_min']:>8.4f}" if task is Task.ENCODER
                  else f"{r['ppl']:>8.3f} {r['increase_pct']:>+7.2f}% {r['top1']:>6.3f}")
        print(f"{r['tool']:<52} {r['seconds']:>7} {r['peak_rss_mb']:>11} {values} {r['speedup']:>7}x")
    if rows and task is Task.CAUSAL_LM:
        print(f"fp32 perplexity: {next((r['ppl_fp32'] for r in rows if 'ppl_fp32' in r), 'n/a')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
