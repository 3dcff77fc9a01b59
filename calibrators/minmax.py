"""Per-channel abs-max calibration, computed inside the graph by ONNX Runtime.

For every target activation X the calibration graph gains::

    last-axis channels ([..., C], MatMul/Gemm inputs):  ReduceMax(Reshape(Abs(X), [-1, C]), axes=[0])
    axis-1 channels (NCHW Conv inputs, rank r):       ReduceMax(Abs(X), axes=[0, 2, ..., r-1])

so only ``[C]`` vectors leave the session; whole activations are never fetched. Vectors
are merged across batches with a running max, so memory does not depend on the number
of samples. The calibration graph is a temporary copy; the model is not changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from calibrators.data import CalibrationData, model_inputs
from calibrators.stats import ChannelStats
from passes.errors import SmoothQuantError
from passes.graph import opset_version
from passes.naming import NameFactory
from passes.onnx_io import PROTOBUF_LIMIT, LoadedModel


@dataclass(frozen=True)
class StatTarget:
    """One activation to calibrate: its name, channel axis (-1 or 1), channel count, rank."""

    tensor: str
    channel_axis: int
    channels: int
    rank: int | None = None  # needed for axis-1 targets only


def _reduce_max(out: str, inp: str, axes: list[int], opset: int, names: NameFactory, tensor: str,
                new_inits: list) -> onnx.NodeProto:
    if opset >= 18:
        axes_name = names.unique(f"{out}::axes")
        new_inits.append(onnx.numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node("ReduceMax", [inp, axes_name], [out], keepdims=0,
                                name=names.amax_node(tensor, "reducemax"))
    return helper.make_node("ReduceMax", [inp], [out], axes=axes, keepdims=0, name=names.amax_node(tensor, "reducemax"))


def build_calibration_graph(model: onnx.ModelProto, targets: Sequence[StatTarget]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with an abs-max output per target; returns it and target -> output name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = NameFactory({n.name for n in graph.node} | {o for n in graph.node for o in n.output}
                        | {t.name for t in graph.initializer} | {i.name for i in graph.input})
    opset = opset_version(model)
    outputs, new_nodes, new_inits = {}, [], []
    for target in targets:
        abs_out = names.unique(f"{target.tensor}::abs")
        new_nodes.append(helper.make_node("Abs", [target.tensor], [abs_out], name=names.amax_node(target.tensor, "abs")))
        amax = names.amax_output(target.tensor)
        if target.channel_axis == -1:
            shape_name = names.unique(f"{target.tensor}::shape")
            new_inits.append(onnx.numpy_helper.from_array(np.array([-1, target.channels], dtype=np.int64), shape_name))
            flat = names.unique(f"{target.tensor}::flat")
            new_nodes.append(helper.make_node("Reshape", [abs_out, shape_name], [flat],
                                              name=names.amax_node(target.tensor, "reshape")))
            new_nodes.append(_reduce_max(amax, flat, [0], opset, names, target.tensor, new_inits))
        elif target.channel_axis == 1:
            axes = [0] + list(range(2, target.rank))
            new_nodes.append(_reduce_max(amax, abs_out, axes, opset, names, target.tensor, new_inits))
        else:
            raise ValueError(f"unsupported channel axis {target.channel_axis}")
        graph.output.append(helper.make_empty_tensor_value_info(amax))
        outputs[target.tensor] = amax
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return out, outputs


def inference_session(proto: onnx.ModelProto, base_dir: Path,
                      providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An ORT session over ``proto`` whose external data stays where it is on disk.

    The graph goes to ORT as bytes (it is small once tensors are external) and ORT reads
    external tensors from ``base_dir``, so nothing is copied or written.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Memory patterns pre-plan one block per input shape on top of the arena: no gain for a
    # one-pass calibration, and a jump in peak RSS after the second batch.
    options.enable_mem_pattern = False
    if any(uses_external_data(t) for t in proto.graph.initializer):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        raise SmoothQuantError("the calibration graph exceeds 2 GiB: store the model's weights as external data")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))


def collect_channel_stats(model: LoadedModel, targets: Sequence[StatTarget], data: CalibrationData, *,
                          progress: bool = True,
                          providers: Sequence[str] = ("CPUExecutionProvider",)) -> ChannelStats:
    """Run ``model`` over ``data`` and return per-channel abs-max of every target activation."""
    if not targets:
        return ChannelStats()
    data.check(model_inputs(model.proto))
    calib, outputs = build_calibration_graph(model.proto, targets)
    fetch = [outputs[t.tensor] for t in targets]
    stats = ChannelStats()
    session = inference_session(calib, model.base_dir, providers)
    bar = tqdm(data.batches(), total=data.num_batches(), desc="calibrating", unit="batch",
               disable=not progress, leave=False)
    for feed in bar:
        try:
            values = session.run(fetch, feed)
        except Exception as e:  # ORT raises its own exception types
            raise SmoothQuantError(f"{model.path}: ONNX Runtime failed on a calibration batch: {e}") from None
        for target, value in zip(targets, values):
            if value.shape != (target.channels,):
                raise SmoothQuantError(
                    f"{model.path}: activation {target.tensor!r} gave {value.shape} channel statistics, "
                    f"expected ({target.channels},)"
                )
            stats.update(target.tensor, value, target.channel_axis)
        stats.num_samples += len(next(iter(feed.values()))) if feed else 0
    if stats.num_samples == 0:
        raise SmoothQuantError(f"{data.description}: calibration set is empty (0 samples)")
    return stats
