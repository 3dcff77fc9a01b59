"""Where a linear op's W8A8 error sits across tokens, for several smoothing strengths.

    python -m bench.token_error MODEL.onnx --calib CALIB.npz --ops NAME [NAME ...] [--alphas none,0.5,0.9]
        [--batch 4] [--json OUT]

For each named MatMul/Gemm (node names), its input X on one calibration batch is read from ONNX
Runtime, and ``Y' = Q(X / s) Q(s W)`` (per-tensor INT8 activations over the batch's real tokens,
per-output-channel INT8 weights, ``s`` from SmoothQuant's formula at each α) is compared with
``Y = X W`` in float64. Printed per α: the summed relative error
(``Σ_t |Y'_t - Y_t|² / Σ_t |Y_t|²``), the first token's share of it, and the mean of the per-token
relative errors with and without the first token. Padding (``attention_mask == 0``) is left out.
(The α search's own objective is the mean of the per-token relative errors, every token weighing
the same, :mod:`passes.search.sensitivity`; the summed form is printed to show what it would hide.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from calibrators.data import CalibrationData
from calibrators.minmax import inference_session
from passes.ir.graph import GraphView
from passes.linear import find_linear_ops
from passes.ir.onnx_io import TensorStore, load_model
from passes.scales import smoothing_scales


def _quantize(x: np.ndarray, amax: float | np.ndarray) -> np.ndarray:
    scale = np.where(np.asarray(amax) > 0, np.asarray(amax) / 127.0, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def token_errors(x: np.ndarray, w: np.ndarray, mask: np.ndarray, alpha: float | None) -> dict:
    """Errors of one op (``x``: [B, T, K], ``w``: [K, N], ``mask``: [B, T] of real tokens)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    amax = np.abs(x[mask]).max(axis=0)
    s = np.ones_like(amax) if alpha is None else smoothing_scales(amax, np.abs(w).max(axis=1), alpha)
    xs, ws = x / s, w * s[:, None]
    y = _quantize(xs, float(np.abs(xs[mask]).max())) @ _quantize(ws, np.abs(ws).max(axis=0, keepdims=True))
    ref = x @ w
    err, norm = ((y - ref) ** 2).sum(-1), (ref ** 2).sum(-1)
    per_token = err / np.maximum(norm, 1e-30)
    later = mask.copy()
    later[:, 0] = False
    return {"alpha": alpha, "summed": float(err[mask].sum() / norm[mask].sum()),
            "first_token_share": float(err[:, 0][mask[:, 0]].sum() / err[mask].sum()),
            "mean_per_token": float(per_token[mask].mean()), "mean_per_token_after_first": float(per_token[later].mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--calib", required=True)
    p.add_argument("--ops", nargs="+", required=True, help="node names of MatMul/Gemm ops with a [K, N] weight")
    p.add_argument("--alphas", default="none,0.5,0.9")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args(argv)
    alphas = [None if a == "none" else float(a) for a in args.alphas.split(",")]
    loaded = load_model(args.model)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    ops = {op.name: op for op in find_linear_ops(view)[0]}
    missing = [n for n in args.ops if n not in ops or ops[n].weight_in_axis != 0]
    if missing:
        raise SystemExit(f"{args.model}: no MatMul/Gemm with a [K, N] weight named {missing}")
    chosen = [ops[n] for n in args.ops]
    proto = onnx.ModelProto()
    proto.CopyFrom(loaded.proto)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(op.activation) for op in chosen)
    feed = next(iter(CalibrationData(args.calib, args.batch).batches()))
    inputs = inference_session(proto, loaded.base_dir).run([op.activation for op in chosen], feed)
    first = next(iter(feed.values()))
    mask = feed["attention_mask"].astype(bool) if "attention_mask" in feed else np.ones(first.shape[:2], bool)
    rows = []
    print(f"{'op':<20} {'α':>5} {'summed E':>10} {'token 0 share':>14} {'mean per token':>15} {'after token 0':>14}")
    for op, x in zip(chosen, inputs):
        w = view.store.array(op.weight)
        for alpha in alphas:
            r = {"op": op.name, **token_errors(x, w, mask, alpha)}
            rows.append(r)
            print(f"{op.name:<20} {'none' if alpha is None else alpha:>5} {r['summed']:>10.3g} "
                  f"{r['first_token_share']:>14.3f} {r['mean_per_token']:>15.3g} {r['mean_per_token_after_first']:>14.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
