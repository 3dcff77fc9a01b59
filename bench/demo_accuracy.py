"""W8A8 (INT8 / FP8) accuracy of the demo models against FP32 on held-out inputs, for several alphas.

    python -m bench.demo_accuracy [--alphas none 0 0.5 0.8 auto] [--precisions int8 fp8] [--json OUT.json]

Metrics per model: mean and min row cosine of the outputs vs FP32, and for the decoder
top-1 agreement of next-token logits. ``none`` is W8A8 without smoothing (s = 1); α=0 is the
formula's other end (s_j = 1 / max|W_j|); ``auto`` searches α per group.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from passes.config import DEFAULT_ALPHA_GRID
from passes import (CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig,
                    run_smoothquant)

DEMO = Path(__file__).resolve().parent.parent / ".cache" / "bench-demo"


def outputs(path: Path, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 4),
            "top1": round(float((a.argmax(1) == b.argmax(1)).mean()), 4)}


def smoothing(alpha: str) -> SmoothingConfig:
    if alpha == "none":
        return SmoothingConfig(enabled=False)
    if alpha == "auto":
        return SmoothingConfig(alpha_grid=DEFAULT_ALPHA_GRID)
    return SmoothingConfig(alpha=float(alpha))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alphas", nargs="+", default=["none", "0", "0.5", "0.8", "auto"])
    p.add_argument("--precisions", nargs="+", default=["int8", "fp8"], choices=[x.value for x in Precision])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    names = ("tiny_llama", "tiny_bert")
    if not all((DEMO / f"{n}.onnx").exists() for n in names):
        from models.tiny import write_demo  # noqa: PLC0415

        write_demo(DEMO, names)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            feeds = dict(np.load(DEMO / f"{name}.eval.npz"))
            ref = outputs(DEMO / f"{name}.onnx", feeds)
            for precision in map(Precision, args.precisions):
                for alpha in args.alphas:
                    config = SmoothQuantConfig(smoothing(alpha), CalibrationConfig(progress=False),
                                               QuantizationConfig(precision))
                    out = run_smoothquant(DEMO / f"{name}.onnx", Path(tmp) / f"{name}_{alpha}.onnx", config=config)
                    rows.append({"model": name, "precision": precision.value, "alpha": alpha,
                                 **compare(ref, outputs(out.written[0], feeds))})
    print(f"{'model':<11} {'prec':>5} {'alpha':>5} {'cos mean':>9} {'cos min':>8} {'top-1':>6}")
    for r in rows:
        top1 = f"{r['top1']:.3f}" if r["model"] == "tiny_llama" else "-"
        print(f"{r['model']:<11} {r['precision']:>5} {r['alpha']:>5} {r['cos_mean']:>9.5f} {r['cos_min']:>8.4f} {top1:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
