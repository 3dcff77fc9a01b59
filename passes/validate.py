"""The tool's own output, validated where it was written, before it replaces anything.

:func:`validate_written_model` runs on the temporary copy (its external data beside it, under the
final names) that :func:`passes.ir.onnx_io.save_model` is about to move into place:

1. ONNX's checker on the file (by path, so external data is checked where it lies);
2. every external tensor's fields and bytes (:func:`passes.ir.onnx_io.check_external_data`);
3. an ONNX Runtime session over it, optimizations off, so every node is resolved and every
   initializer read: for models ONNX Runtime can run (not the ``com.smoothquant`` TensorRT plugin
   ops) and of at most :data:`ORT_CHECK_BYTES` of tensors (a session holds its weights in memory;
   above that, 1 and 2 are the check, and the result says so).

A failure is a :class:`SmoothQuantError` naming the file: nothing was committed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from passes.ir.errors import SmoothQuantError
from passes.ir.onnx_io import check_external_data
from plugins import schema

ORT_CHECK_BYTES = 4 << 30


def validate_written_model(path: Path, shown_as: Path | None = None) -> str:
    """Raise if the model at ``path`` is not valid; return how it was checked (``shown_as``: the name in errors)."""
    name = shown_as or path
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise SmoothQuantError(f"{name}: the written model fails ONNX's checker: {str(e).strip().splitlines()[0]}"
                               ) from None
    proto = onnx.load_model(str(path), load_external_data=False)
    check_external_data(proto, path.parent, name)
    if any(n.domain == schema.DOMAIN for n in proto.graph.node):
        return "ONNX checker and external data (ONNX Runtime cannot run the TensorRT plugin ops)"
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.iterdir() if p != path and p.is_file())
    if size > ORT_CHECK_BYTES:
        return f"ONNX checker and external data ({size / 2**30:.1f} GiB: no ONNX Runtime session)"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises many types
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmoothQuantError(f"{name}: ONNX Runtime cannot load the written model: {detail}") from None
    return "ONNX checker, external data and an ONNX Runtime session"
