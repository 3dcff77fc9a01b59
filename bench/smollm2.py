"""SmolLM2-135M-Instruct on real text: perplexity of our W8A8 settings against fp32 (ORT CPU).

    python -m bench.smollm2 [--out models/real] [--only TEXT] [--json OUT.json]

Exports the model and the Debian-handbook sets first if needed (``python -m models.export
smollm2``: 32 x 256 calibration tokens, 16 x 256 held-out tokens from disjoint paragraphs).
Each row: quantization time, perplexity on the held-out tokens, its increase over fp32, and
next-token top-1 agreement with fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.export import export
from bench.common import quantize_each
from passes import CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig
from passes.config import DEFAULT_ALPHA_GRID, Granularity, Target, Unfoldable, WeightRounding
from passes.evaluate import Task, evaluate

QUIET = CalibrationConfig(progress=False, batch_size=4)


def settings() -> list[tuple[str, SmoothQuantConfig]]:
    def cfg(smoothing, **quant):
        return SmoothQuantConfig(smoothing, QUIET, QuantizationConfig(**quant))

    per_token = {"granularity": Granularity.PER_TOKEN, "target": Target.ONNXRUNTIME}
    gptq = {"weight_rounding": WeightRounding.GPTQ}
    return [
        ("int8 per-tensor, no smoothing", cfg(SmoothingConfig(enabled=False))),
        ("int8 per-tensor, α=0.5", cfg(SmoothingConfig(0.5))),
        ("int8 per-tensor, α=0.8", cfg(SmoothingConfig(0.8))),
        ("int8 per-tensor, α auto", cfg(SmoothingConfig(alpha_grid=(0.5, 0.6, 0.7, 0.8, 0.9)))),
        ("int8 per-tensor, α=0.8, 8 FP layers", cfg(SmoothingConfig(0.8), max_fp_layers=8)),
        ("int8 per-tensor, α=0.8, clip search", cfg(SmoothingConfig(0.8), clip_grid=(1.0, 0.5, 0.25, 0.1))),
        ("int8 per-tensor, α=0.8, --target onnxruntime", cfg(SmoothingConfig(0.8), target=Target.ONNXRUNTIME)),
        ("fp8 per-tensor, no smoothing", cfg(SmoothingConfig(enabled=False), precision=Precision.FP8)),
        ("fp8 per-tensor, α=0.5", cfg(SmoothingConfig(0.5), precision=Precision.FP8)),
        ("int8 per-tensor, α=0.8, gptq", cfg(SmoothingConfig(0.8), **gptq)),
        ("int8 per-tensor, α=0.8, --target onnxruntime, gptq", cfg(SmoothingConfig(0.8), target=Target.ONNXRUNTIME,
                                                                   **gptq)),
        ("int8 per-tensor, α=0.8, --target onnxruntime, gptq, --quantize-tied",
         cfg(SmoothingConfig(0.8), target=Target.ONNXRUNTIME, quantize_tied=True, **gptq)),
        ("fp8 per-tensor, no smoothing, gptq", cfg(SmoothingConfig(enabled=False), precision=Precision.FP8, **gptq)),
        ("fp8 per-tensor, α=0.5, gptq", cfg(SmoothingConfig(0.5), precision=Precision.FP8, **gptq)),
        ("fp8 per-tensor, α auto, gptq", cfg(SmoothingConfig(alpha_grid=DEFAULT_ALPHA_GRID), precision=Precision.FP8, **gptq)),
        ("fp8 per-tensor, α auto, --unfoldable split, gptq",
         cfg(SmoothingConfig(alpha_grid=DEFAULT_ALPHA_GRID, unfoldable=Unfoldable.SPLIT), precision=Precision.FP8, **gptq)),
        ("int8 per-tensor, α=0.8, --fold-attention-values", cfg(SmoothingConfig(0.8, attention_values=True))),
        ("int8 per-tensor, α auto, --fold-attention-values",
         cfg(SmoothingConfig(alpha_grid=(0.5, 0.6, 0.7, 0.8, 0.9), attention_values=True))),
        ("fp8 per-tensor, α auto, --unfoldable split, gptq, --fold-attention-values",
         cfg(SmoothingConfig(alpha_grid=DEFAULT_ALPHA_GRID, unfoldable=Unfoldable.SPLIT, attention_values=True),
             precision=Precision.FP8, **gptq)),
        ("int8 per-token, no smoothing", cfg(SmoothingConfig(enabled=False), **per_token)),
        ("int8 per-token, α=0.5", cfg(SmoothingConfig(0.5), **per_token)),
        ("int8 per-token, α=0.8", cfg(SmoothingConfig(0.8), **per_token)),
        ("fp8 per-token, no smoothing", cfg(SmoothingConfig(enabled=False), precision=Precision.FP8, **per_token)),
        ("fp8 per-token, α=0.5", cfg(SmoothingConfig(0.5), precision=Precision.FP8, **per_token)),
        ("fp8 per-token, α=0.8", cfg(SmoothingConfig(0.8), precision=Precision.FP8, **per_token)),
        ("int8 per-token, α=0.5, gptq", cfg(SmoothingConfig(0.5), **per_token, **gptq)),
        ("fp8 per-token, α=0.5, gptq", cfg(SmoothingConfig(0.5), precision=Precision.FP8, **per_token, **gptq)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/real")
    p.add_argument("--only", help="run only settings whose label contains this")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    model = export("smollm2", Path(args.out))
    data = model.with_name("smollm2.eval.npz")
    rows = []
    for label, out, seconds in quantize_each(model, settings(), args.only):
        m = evaluate(model, out, data, task=Task.CAUSAL_LM, batch_size=4).metrics
        rows.append({"setting": label, "quantize_s": round(seconds, 1), "ppl_fp32": round(m["perplexity_ref"], 3),
                     "ppl": round(m["perplexity_cand"], 3), "increase_pct": round(m["perplexity_increase_pct"], 2),
                     "top1": round(m["top1_agreement"], 4)})
    print(f"\n{'setting':<52} {'quant s':>7} {'ppl':>8} {'vs fp32':>8} {'top-1':>6}")
    for r in rows:
        print(f"{r['setting']:<52} {r['quantize_s']:>7} {r['ppl']:>8.3f} {r['increase_pct']:>+7.2f}% {r['top1']:>6.3f}")
    if rows:
        print(f"fp32 perplexity: {rows[0]['ppl_fp32']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
