"""ONNX Runtime CPU: the fused SkipLayerNormalization kernel against the Add + LayerNormalization it replaces.

    python -m bench.skip_layer_norm [--shapes 1x128x384 8x128x384 ...] [--threads 1 2] [--rounds 200] [--json OUT]

ORT's SkipLayerNormFusion rewrites ``Add(a, b) -> LayerNormalization`` into one
``com.microsoft.SkipLayerNormalization`` at session creation (the residual add and norm of every
BERT block). Both graphs here compute ``LayerNorm(a + b)`` over the last axis; the unfused one is
built with that fusion disabled so ORT runs the two ops as written. Each row times both in
alternation on the same inputs (median of ``--rounds`` runs after warm-up) and checks that they
agree. A ratio above 1 means the fused kernel is slower.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _session(nodes: list[onnx.NodeProto], shape: list[int], threads: int) -> ort.InferenceSession:
    hidden = shape[-1]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes, "skip_layer_norm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(rng.uniform(0.5, 1.5, hidden).astype(np.float32), "gamma"),
         numpy_helper.from_array(rng.normal(0, 0.1, hidden).astype(np.float32), "beta")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["SkipLayerNormFusion"])


def measure(shape: list[int], threads: int, rounds: int) -> dict:
    unfused = _session([helper.make_node("Add", ["a", "b"], ["s"]),
                        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"],
                                         axis=-1, epsilon=1e-12)], shape, threads)
    fused = _session([helper.make_node("SkipLayerNormalization", ["a", "b", "gamma", "beta"], ["y"],
                                       domain="com.microsoft", epsilon=1e-12)], shape, threads)
    rng = np.random.default_rng(1)
    feed = {n: rng.standard_normal(shape).astype(np.float32) for n in ("a", "b")}
    err = float(np.abs(fused.run(None, feed)[0] - unfused.run(None, feed)[0]).max())
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    warmup = max(rounds // 10, 5)
    for r in range(rounds + warmup):
        for name, sess in (("unfused", unfused), ("fused", fused)):
            start = time.perf_counter()
            sess.run(None, feed)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {"shape": "x".join(map(str, shape)), "threads": threads, "add_layernorm_ms": round(ms["unfused"], 4),
            "skiplayernorm_ms": round(ms["fused"], 4), "fused_over_unfused": round(ms["fused"] / ms["unfused"], 2),
            "max_abs_diff": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x128x384", "8x128x384", "8x128x768", "4x512x1024"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [measure([int(d) for d in s.split("x")], t, args.rounds) for s in args.shapes for t in args.threads]
    print(f"onnxruntime {ort.__version__}, CPU")
    print(f"{'shape':<12} {'threads':>7} {'Add+LN ms':>10} {'SkipLN ms':>10} {'SkipLN / Add+LN':>16} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['shape']:<12} {r['threads']:>7} {r['add_layernorm_ms']:>10.3f} {r['skiplayernorm_ms']:>10.3f} "
              f"{r['fused_over_unfused']:>15.2f}x {r['max_abs_diff']:>11.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
