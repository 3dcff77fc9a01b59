"""Per-channel min/max calibration, computed inside the graph by ONNX Runtime.

For every target activation X the calibration graph gains::

    last-axis channels ([..., C], MatMul/Gemm inputs):  R(Reshape(X, [-1, C]), axes=[0])
    axis-1 channels (NCHW Conv inputs, rank r):       R(X, axes=[0, 2, ..., r-1])

for R in (ReduceMax, ReduceMin), so only two ``[C]`` vectors leave the session; whole
activations are never fetched. ``max|X_j| = max(max_j, -min_j)``. Vectors are merged
across batches with a running max/min, so memory does not depend on the number of
samples. The calibration graph is a temporary copy; the model is not changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from passes.ir.errors import SmoothQuantError
from passes.ir.graph import make_reduce, opset_version
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import INLINE_TENSOR_BYTES, PROTOBUF_LIMIT, LoadedModel, make_inline, tensor_nbytes


@dataclass(frozen=True)
class StatTarget:
    """One activation to calibrate: its name, channel axis (-1 or 1), channel count, rank."""

    tensor: str
    channel_axis: int
    channels: int
    rank: int | None = None  # needed for axis-1 targets only


# Inline initializers at least this large are handed to ORT as OrtValues instead of being
# serialized with the graph: no copy of the model proto, no serialized copy of the weights.
INLINE_SPLIT_BYTES = 1 << 16
INJECTED = "__smoothquant_injected__"  # location of the stubs ORT replaces with the OrtValues
# Types OrtValue.ortvalue_from_numpy takes (numpy's own; not float8, int4 or bfloat16 from ml_dtypes).
_ORTVALUE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                   onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                   onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """Name, type and shape of ``tensor`` marked external: ORT's add_external_initializers replaces it."""
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    entry = stub.external_data.add()
    entry.key, entry.value = "location", INJECTED
    return stub


def _escapes(base_dir: Path, location: str) -> bool:
    """True if ``location`` resolves outside ``base_dir`` (through a symlink), which ORT refuses."""
    real, root = os.path.realpath(base_dir / location), os.path.realpath(base_dir)
    return os.path.commonpath([real, root]) != root


def split_large_inline(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of ``model`` whose large inline initializers are stubs, and those initializers (not copied)."""
    inputs = {i.name for i in model.graph.input}
    big = [t for t in model.graph.initializer
           if not uses_external_data(t) and t.name not in inputs and t.data_type in _ORTVALUE_TYPES
           and (tensor_nbytes(t) or 0) >= INLINE_SPLIT_BYTES]
    big_names = {t.name for t in big}
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    src, graph = model.graph, light.graph
    graph.name, graph.doc_string = src.name, src.doc_string
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    graph.initializer.extend(_stub(t) if t.name in big_names else t for t in src.initializer)
    return light, big


def build_calibration_graph(model: onnx.ModelProto, targets: Sequence[StatTarget]
                            ) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]], list[onnx.TensorProto]]:
    """A copy of ``model`` with per-channel min and max outputs per target; returns it, target ->
    (min output, max output), and the large inline initializers left out of the copy (pass them
    to :func:`inference_session`)."""
    out, big = split_large_inline(model)
    graph = out.graph
    names = NameFactory.for_graph(graph)
    opset = opset_version(model)
    outputs, new_nodes, new_inits = {}, [], []
    for target in targets:
        if target.channel_axis == -1:
            shape_name = names.unique(f"{target.tensor}::shape")
            new_inits.append(onnx.numpy_helper.from_array(np.array([-1, target.channels], dtype=np.int64), shape_name))
            source, axes = names.unique(f"{target.tensor}::flat"), [0]
            new_nodes.append(helper.make_node("Reshape", [target.tensor, shape_name], [source],
                                              name=names.amax_node(target.tensor, "reshape")))
        elif target.channel_axis == 1:
            source, axes = target.tensor, [0] + list(range(2, target.rank))
        else:
            raise ValueError(f"unsupported channel axis {target.channel_axis}")
        lo, hi = names.amax_output(f"{target.tensor}::min"), names.amax_output(f"{target.tensor}::max")

        def add_axes(value: np.ndarray, result: str) -> str:
            new_inits.append(onnx.numpy_helper.from_array(value, names.unique(f"{result}::axes")))
            return new_inits[-1].name

        for op, result in (("ReduceMin", lo), ("ReduceMax", hi)):
            new_nodes.append(make_reduce(op, source, result, axes, opset, names.amax_node(target.tensor, op.lower()),
                                         0, lambda value, result=result: add_axes(value, result)))
        graph.output.extend([helper.make_empty_tensor_value_info(lo), helper.make_empty_tensor_value_info(hi)])
        outputs[target.tensor] = (lo, hi)
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return out, outputs, big


def inference_session(proto: onnx.ModelProto, base_dir: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                      initializers: Sequence[onnx.TensorProto] = (), *,
                      early_consumers: bool = False, prepack: bool = True,
                      disabled_optimizers: Sequence[str] = ()) -> ort.InferenceSession:
    """An ORT session over ``proto`` whose external data stays where it is on disk.

    The graph goes to ORT as bytes without its large inline tensors: those (and ``initializers``,
    tensors a caller already split off) go as OrtValues ORT uses in place, and ORT reads
    external tensors from ``base_dir``, so the weights are neither serialized nor written.
    ``early_consumers``: ORT's priority-based execution order, which runs a tensor's side
    branches soon after it instead of keeping it alive to the end (for graphs that hang a
    small branch off every layer, like the sensitivity measurement). ``prepack=False``: ORT keeps
    no second, pre-packed copy of the weights (less memory, slower GEMMs). ``disabled_optimizers``:
    ORT graph transformers not to apply, by name (ORT ignores names it does not know).
    """
    proto, big = split_large_inline(proto)
    linked_arrays, linked = [], []
    for i, t in enumerate(proto.graph.initializer):  # (a copy of the graph)
        if not uses_external_data(t):
            continue
        if (tensor_nbytes(t) or 0) < INLINE_TENSOR_BYTES:  # ORT's shape inference cannot read these (axes...)
            make_inline(t, base_dir)
        elif t.data_type in _ORTVALUE_TYPES and _escapes(base_dir, ExternalDataInfo(t).location):
            # a file linked from elsewhere (a Hugging Face cache): ORT refuses it, so map it here
            info = ExternalDataInfo(t)
            linked_arrays.append(np.memmap(os.path.realpath(base_dir / info.location), mode="r",
                                           dtype=helper.tensor_dtype_to_np_dtype(t.data_type),
                                           offset=info.offset or 0, shape=tuple(t.dims)))
            linked.append(t.name)
            proto.graph.initializer[i].CopyFrom(_stub(t))
    big = [*big, *initializers]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Memory patterns pre-plan one block per input shape on top of the arena: no gain for a
    # one-pass calibration, and a jump in peak RSS after the second batch.
    options.enable_mem_pattern = False
    if early_consumers:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if any(uses_external_data(t) for t in proto.graph.initializer):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    arrays = [numpy_helper.to_array(t) for t in big] + linked_arrays
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if arrays:
        options.add_external_initializers([t.name for t in big] + linked, values)
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        raise SmoothQuantError("the calibration graph exceeds 2 GiB: store the model's weights as external data")
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers),
                                       disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as e:  # noqa: BLE001 - ORT's own exception types (types, shapes, unknown ops)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmoothQuantError(f"ONNX Runtime cannot load the model (from {base_dir}): {detail}") from None
    session._sq_external_initializers = (arrays, values)  # ORT reads them in place: keep them alive
    return session
