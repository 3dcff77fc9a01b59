"""How far the default search's cheap measurement can be trusted: sampled vs full, per group.

    python -m bench.search_check [--models minilm smollm2] [--precision int8] [--json OUT.json]

The default α search measures every candidate of every group in one pass over the first
``search_tokens`` calibration tokens, each twin GEMM on a sample of its output channels
(:mod:`passes.search.sensitivity`). This runs the same search twice on the same statistics,
cheap (the default) and full (every token, every column), and compares per group: whether both
pick the same candidate, the *regret* (the full error of the cheap pick over the full minimum;
1.0 = the same quality), and the cheap error of each candidate against its full error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from calibrators.data import CalibrationData
from calibrators.calibrate import collect_channel_stats
from models.export import export
from passes.config import DEFAULT_ALPHA_GRID, CalibrationConfig, Precision, QuantizationConfig, SmoothQuantConfig
from passes.ir.graph import GraphView, opset_version
from passes.ir.onnx_io import TensorStore, load_model
from passes.linear import find_linear_ops
from passes.pipeline import convert_opset
from passes.search.alpha import search_alpha
from passes.smooth import find_groups, stat_targets


def compare(name: str, out: Path, precision: Precision) -> dict:
    model = export(name, out)
    loaded = load_model(model)
    if precision is Precision.FP8:
        loaded = convert_opset(loaded, 19)
    config = SmoothQuantConfig(quantization=QuantizationConfig(precision=precision))
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    ops = find_linear_ops(view)[0]
    groups = find_groups(view, ops, config.unfoldable, fold_scalars=True)
    data = CalibrationData(model.with_name(f"{name}.calib.npz"), CalibrationConfig().batch_size)
    stats = collect_channel_stats(loaded, stat_targets(view, ops), data, progress=False)
    runs = {}
    for label, tokens, columns in (("cheap", CalibrationConfig().search_tokens, True), ("full", None, False)):
        start = time.perf_counter()
        _, _, choices = search_alpha(loaded, loaded.proto, view, groups, stats, opset_version(loaded.proto),
                                     config.quantization, data, DEFAULT_ALPHA_GRID, split_ratio=config.split_ratio,
                                     max_tokens=tokens, sample_columns=columns, progress=False)
        runs[label] = ({c.activation: c for c in choices}, time.perf_counter() - start)
    cheap, full = runs["cheap"][0], runs["full"][0]
    same, regret, ratio = 0, [], []
    for act, c in cheap.items():
        f = full[act]
        same += c.alpha == f.alpha
        regret.append(f.errors[c.alpha] / f.errors[f.alpha] if f.errors[f.alpha] > 0 else 1.0)
        ratio += [c.errors[k] / f.errors[k] for k in c.errors if f.errors.get(k, 0) > 0 and np.isfinite(c.errors[k])]
    return {"model": name, "precision": precision.value, "groups": len(cheap), "same_choice": same,
            "regret_mean": float(np.mean(regret)), "regret_max": float(np.max(regret)),
            "error_ratio_median": float(np.median(ratio)), "error_ratio_p10": float(np.percentile(ratio, 10)),
            "error_ratio_p90": float(np.percentile(ratio, 90)),
            "cheap_s": round(runs["cheap"][1], 1), "full_s": round(runs["full"][1], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--precision", nargs="+", default=["int8", "fp8"])
    p.add_argument("--out", default="models/real")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [compare(m, Path(args.out), Precision(pr)) for m in args.models for pr in args.precision]
    print(f"\n{'model':<8} {'prec':<5} {'groups':>6} {'same pick':>9} {'regret mean/max':>16} "
          f"{'cheap/full error p10/med/p90':>29} {'cheap s':>8} {'full s':>7}")
    for r in rows:
        print(f"{r['model']:<8} {r['precision']:<5} {r['groups']:>6} {r['same_choice']:>9} "
              f"{r['regret_mean']:>8.3f}/{r['regret_max']:<7.3f} "
              f"{r['error_ratio_p10']:>10.3f}/{r['error_ratio_median']:.3f}/{r['error_ratio_p90']:<10.3f} "
              f"{r['cheap_s']:>8} {r['full_s']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
