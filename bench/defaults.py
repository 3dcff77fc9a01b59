"""The default command on the real models: accuracy, and its cost against plain inference.

    python -m bench.defaults [--models minilm smollm2 mpnet gemma3] [--only TEXT] [--rounds 20] [--json OUT.json]

Each row runs ``python -m passes.smoothquant MODEL -o OUT [FLAGS]`` in a fresh process (the
CLI as a user runs it: no tuning flags, only the target, precision or granularity) and
reports its wall time and peak RSS (VmHWM), the output's accuracy on the held-out set
(MiniLM: cosine of pooled embeddings; SmolLM2: perplexity increase), and for
``--target onnxruntime`` its CPU speed-up over fp32 (alternating). The first row of each
model is plain ONNX Runtime inference over the same calibration data at the same batch size
(outputs fetched), in a fresh process too: ``time x`` and ``RSS x`` are ratios to it, measured
in this one run. ``--fast`` rows are the one-pass path, for comparison.
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
BATCH = 8  # the CLI's default calibration batch
ENCODER_ROWS = [[], ["--target", "onnxruntime"], ["--precision", "fp8"], ["--fast"],
                ["--fast", "--target", "onnxruntime"]]
DECODER_ROWS = [[], ["--precision", "fp8"], ["--granularity", "per-token", "--target", "onnxruntime"],
                ["--precision", "fp8", "--granularity", "per-token", "--target", "onnxruntime"], ["--fast"]]
ROWS = {"minilm": ENCODER_ROWS, "smollm2": DECODER_ROWS,
        "mpnet": ENCODER_ROWS, "gemma3": DECODER_ROWS}  # held-out families (models.export): never tuned on


def child(argv: list[str]) -> dict:
    from bench.calib_memory import peak_rss_kb  # noqa: PLC0415

    start = time.perf_counter()
    if argv[0] == "inference":
        import onnxruntime as ort  # noqa: PLC0415

        from calibrators import CalibrationData  # noqa: PLC0415

        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(argv[1], so, providers=["CPUExecutionProvider"])
        for feed in CalibrationData(argv[2], BATCH).batches():
            session.run(None, feed)
    else:
        from passes.smoothquant import main  # noqa: PLC0415

        if main(argv) != 0:
            raise SystemExit(1)
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def run_child(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.defaults", "--child", *argv], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=list(ROWS))
    p.add_argument("--out", default="models/real")
    p.add_argument("--only", help="run only rows whose flags contain this")
    p.add_argument("--rounds", type=int, default=20, help="latency rounds for --target onnxruntime rows")
    p.add_argument("--json")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    from models.export import ENCODERS, export  # noqa: PLC0415
    from passes.evaluate import Task, evaluate  # noqa: PLC0415

    rows = []
    for name in args.models:
        model = export(name, Path(args.out))
        calib, data = model.with_name(f"{name}.calib.npz"), model.with_name(f"{name}.eval.npz")
        base = {"model": name, "flags": "plain ORT inference", **run_child(["inference", str(model), str(calib)])}
        rows.append(base)
        for flags in ROWS[name]:
            label = " ".join(flags) or "(default)"
            if args.only and args.only not in label:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "q.onnx"
                row = {"model": name, "flags": label, **run_child([str(model), "-o", str(out), "-q", *flags])}
                if "error" not in row:
                    ort_target = "onnxruntime" in flags and "per-token" not in flags
                    m = evaluate(model, out, data, task=Task.ENCODER if name in ENCODERS else Task.CAUSAL_LM,
                                 batch_size=4, latency_rounds=args.rounds if ort_target else 0).metrics
                    row.update({k: round(v, 5) for k, v in m.items() if k in (
                        "cosine_mean", "cosine_min", "perplexity_increase_pct", "top1_agreement", "speedup")})
                    if "error" not in base:
                        row["time_vs_inference"] = round(row["seconds"] / base["seconds"], 2)
                        row["rss_vs_inference"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 2)
            rows.append(row)
            print(f"done: {name} {label}", flush=True)
    print(f"\n{'model':<8} {'flags':<58} {'s':>7} {'RSS MB':>7} {'time x':>6} {'RSS x':>6}  accuracy")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<8} {r['flags']:<58} failed: {r['error']}")
            continue
        acc = (f"cos {r['cosine_mean']:.5f} (min {r['cosine_min']:.4f})" if "cosine_mean" in r else
               f"ppl {r['perplexity_increase_pct']:+.2f}%" if "perplexity_increase_pct" in r else "")
        acc += f", {r['speedup']:.2f}x fp32" if "speedup" in r else ""
        print(f"{r['model']:<8} {r['flags']:<58} {r['seconds']:>7} {r['peak_rss_mb']:>7} "
              f"{r.get('time_vs_inference', 1.0):>5}x {r.get('rss_vs_inference', 1.0):>5}x  {acc}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
