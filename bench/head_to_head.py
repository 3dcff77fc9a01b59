"""ONNX Runtime CPU latency of several models on one batch, timed in alternation.

    python -m bench.head_to_head BASE.onnx A.onnx B.onnx ... --data EVAL.npz [--batch 8] [--rounds 100]
        [--disable-optimizer NAME] [--json OUT]

One session per model (default graph optimizations, default threads); each round runs every
model once, in turn, so machine noise hits them alike, and the order rotates from round to
round (a model run right after another one is measurably slower or faster, by a few percent
here, depending on which one precedes it). Each turn runs the model ``--repeat`` times and keeps
the median of all runs but the first (the one that pays for the switch). The table gives the median ms per run
and each model's speed relative to the first (``> 1``: faster than BASE), with the spread of
the per-round ratio (25th-75th percentile).

``--disable-optimizer NAME`` (repeatable; an ORT graph transformer such as
``SkipLayerNormFusion``) adds, for every model, a second session built without it, timed in the
same rotation: a runtime setting a deployment can choose applies to every model alike, so its
effect is measured on all of them side by side rather than credited to one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from calibrators.data import CalibrationData


def session(model: Path, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="the first one is the baseline")
    p.add_argument("--data", required=True, help="inputs (.npz); the first batch is used")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="runs per model per turn (the first is not timed)")
    p.add_argument("--disable-optimizer", action="append", default=[], metavar="NAME",
                   help="also time every model in a session without this ORT graph transformer "
                        "(e.g. SkipLayerNormFusion); repeatable")
    p.add_argument("--json")
    args = p.parse_args(argv)
    feed = next(iter(CalibrationData(args.data, args.batch).batches()))
    variants = [((), str(m), m) for m in args.models]
    if args.disable_optimizer:
        off = tuple(args.disable_optimizer)
        variants += [(off, f"{m} (without {', '.join(off)})", m) for m in args.models]
    sessions = [session(m, off) for off, _, m in variants]
    times = np.zeros((args.rounds, len(sessions)))
    n = len(sessions)
    for r in range(-args.warmup, args.rounds):
        for i in ((r + k) % n for k in range(n)):
            sessions[i].run(None, feed)
            runs = []
            for _ in range(max(args.repeat - 1, 1)):
                start = time.perf_counter()
                sessions[i].run(None, feed)
                runs.append(time.perf_counter() - start)
            if r >= 0:
                times[r, i] = float(np.median(runs))
    ratio = times[:, :1] / times  # per round: baseline time / model time
    rows = [{"model": label, "disabled_optimizers": list(off), "median_ms": round(float(np.median(times[:, i])) * 1e3, 2),
             "speed_vs_first": round(float(np.median(ratio[:, i])), 4),
             "ratio_p25": round(float(np.percentile(ratio[:, i], 25)), 4),
             "ratio_p75": round(float(np.percentile(ratio[:, i], 75)), 4)} for i, (off, label, _) in enumerate(variants)]
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  median ms  speed vs first (p25-p75)")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['median_ms']:9.2f}  {r['speed_vs_first']:.3f}x "
              f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "rounds": args.rounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
