"""all-MiniLM-L6-v2 on real text: our W8A8 settings against fp32, accuracy and ORT CPU latency.

    python -m bench.minilm [--out models/real] [--rounds 20] [--json OUT.json]

Exports the model and the Debian-handbook calibration/evaluation sets first if needed
(``python -m models.export minilm``). Each row: one quantization setting; sentence-embedding
cosine vs fp32 (mean, min) and Spearman of pairwise similarities on the held-out paragraphs,
then fp32 and candidate latency on one batch (8 x 128 tokens), timed alternately, and the
speed-up. FP8 has no CPU kernels in ONNX Runtime: it is emulated there, so its latency says
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.export import export
from bench.common import quantize_each
from passes import CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig
from passes.config import DEFAULT_ALPHA_GRID, Target, Unfoldable, WeightRounding
from passes.evaluate import evaluate

GRID = (*DEFAULT_ALPHA_GRID, 0.95, 1.0)
QUIET = CalibrationConfig(progress=False)


def settings() -> list[tuple[str, SmoothQuantConfig]]:
    def cfg(smoothing, precision=Precision.INT8, target=Target.TENSORRT, rounding=WeightRounding.NEAREST):
        return SmoothQuantConfig(smoothing, QUIET, QuantizationConfig(precision=precision, target=target,
                                                                      weight_rounding=rounding))

    gptq = WeightRounding.GPTQ

    return [
        ("int8 no smoothing", cfg(SmoothingConfig(enabled=False))),
        ("int8 α=0.5", cfg(SmoothingConfig(0.5))),
        ("int8 α=0.9", cfg(SmoothingConfig(0.9))),
        ("int8 α auto", cfg(SmoothingConfig(alpha_grid=GRID))),
        ("int8 α auto, --target onnxruntime", cfg(SmoothingConfig(alpha_grid=GRID), target=Target.ONNXRUNTIME)),
        ("fp8 no smoothing", cfg(SmoothingConfig(enabled=False), Precision.FP8)),
        ("fp8 α=0.5", cfg(SmoothingConfig(0.5), Precision.FP8)),
        ("fp8 α auto", cfg(SmoothingConfig(alpha_grid=GRID), Precision.FP8)),
        ("int8 no smoothing, --target onnxruntime, gptq", cfg(SmoothingConfig(enabled=False), target=Target.ONNXRUNTIME,
                                                              rounding=gptq)),
        ("int8 α auto, --target onnxruntime, gptq", cfg(SmoothingConfig(alpha_grid=GRID), target=Target.ONNXRUNTIME,
                                                        rounding=gptq)),
        # Before the outlier split was the onnxruntime default: GELU groups smoothed through an explicit Mul.
        ("int8 α auto, --target onnxruntime, gptq, --unfoldable mul",
         cfg(SmoothingConfig(alpha_grid=GRID, unfoldable=Unfoldable.MUL), target=Target.ONNXRUNTIME, rounding=gptq)),
        ("int8 α auto, --target onnxruntime, gptq, --fold-attention-values",
         cfg(SmoothingConfig(alpha_grid=GRID, attention_values=True), target=Target.ONNXRUNTIME, rounding=gptq)),
        ("fp8 no smoothing, gptq", cfg(SmoothingConfig(enabled=False), Precision.FP8, rounding=gptq)),
        ("fp8 α auto, gptq", cfg(SmoothingConfig(alpha_grid=GRID), Precision.FP8, rounding=gptq)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/real", help="where the exported model and data live")
    p.add_argument("--rounds", type=int, default=20, help="latency rounds (alternating fp32 / candidate)")
    p.add_argument("--only", help="run only settings whose label contains this")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    model = export("minilm", Path(args.out))
    data = model.with_name("minilm.eval.npz")
    rows = []
    for label, out, seconds in quantize_each(model, settings(), args.only):
        ev = evaluate(model, out, data, batch_size=8, latency_rounds=args.rounds)
        m = ev.metrics
        rows.append({"setting": label, "quantize_s": round(seconds, 1), "samples": ev.samples,
                     "cos_mean": round(m["cosine_mean"], 5), "cos_min": round(m["cosine_min"], 4),
                     "spearman": round(m["similarity_spearman"], 4), "fp32_ms": round(m["latency_ref_ms"], 1),
                     "ours_ms": round(m["latency_cand_ms"], 1), "speedup": round(m["speedup"], 2)})
    print(f"\n{'setting':<47} {'quant s':>7} {'cos mean':>9} {'cos min':>8} {'spearman':>8} {'fp32 ms':>8} "
          f"{'ours ms':>8} {'speed-up':>8}")
    for r in rows:
        print(f"{r['setting']:<47} {r['quantize_s']:>7} {r['cos_mean']:>9.5f} {r['cos_min']:>8.4f} {r['spearman']:>8.4f} "
              f"{r['fp32_ms']:>8} {r['ours_ms']:>8} {r['speedup']:>7}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
