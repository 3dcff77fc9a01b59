"""Where W8A8 error comes from: weights only, activations only, both (one model, one precision).

    python -m bench.error_split [--model minilm|smollm2] [--precision fp8|int8] [--out models/real]

Quantizes the model once with ``--weights float`` (FP weight -> Q -> DQ, no smoothing), then
evaluates three graphs against fp32 with ``passes.evaluate``: the full W8A8 model, the same with
the activation Q/DQ pairs removed (weights-only error) and with the weight Q/DQ pairs removed
(activations-only error).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx

from models.export import export
from passes import CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig, run_smoothquant
from passes.config import WeightStorage
from passes.evaluate import Task, evaluate
from passes.ir.onnx_io import load_model, save_model


def without_qdq(loaded, out: Path, weights: bool) -> Path:
    """A copy of the quantized model with the weight (``weights``) or activation Q/DQ pairs bypassed."""
    proto = onnx.ModelProto()
    proto.CopyFrom(loaded.proto)
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    bypass = {}
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        if (q.input[0] in constants) == weights:
            bypass[dq.output[0]] = q.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = bypass.get(name, name)
    save_model(proto, out, loaded.base_dir, inline_in_source=loaded.lazy_inline)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--precision", choices=[x.value for x in Precision], default="fp8")
    p.add_argument("--out", default="models/real")
    args = p.parse_args(argv)
    model = export(args.model, Path(args.out))
    data = model.with_name(f"{args.model}.eval.npz")
    task = Task.ENCODER if args.model == "minilm" else Task.CAUSAL_LM
    batch = 8 if args.model == "minilm" else 4
    config = SmoothQuantConfig(SmoothingConfig(enabled=False), CalibrationConfig(progress=False, batch_size=batch),
                               QuantizationConfig(precision=Precision(args.precision), weights=WeightStorage.FLOAT))
    key = "cosine_mean" if task is Task.ENCODER else "perplexity_increase_pct"
    with tempfile.TemporaryDirectory() as tmp:
        full = run_smoothquant(model, Path(tmp) / "full.onnx", config=config).written[0]
        loaded = load_model(full)
        variants = {"weights and activations": full,
                    "weights only": without_qdq(loaded, Path(tmp) / "w.onnx", weights=False),
                    "activations only": without_qdq(loaded, Path(tmp) / "a.onnx", weights=True)}
        print(f"\n{args.model}, {args.precision} per-tensor, no smoothing: {key} vs fp32")
        for label, path in variants.items():
            metrics = evaluate(model, path, data, task=task, batch_size=batch).metrics
            print(f"  {label:<24} {metrics[key]:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
