"""Trace which value column feeds each input channel of an attention output projection.

The fold site (:class:`passes.patterns.AttentionValueFold`) is::

    X = L2(P @ L1(V)),   V = Y W_v [+ b_v]

with L1, L2 layout ops (Reshape, Transpose, Unsqueeze, Squeeze, Expand, Identity) and P, the
attention weights, multiplying from the left. MatMul contracts P's last axis with the
second-to-last axis of ``B = L1(V)``; if every element of B along that axis comes from one
column of V (its token axis, not its channel axis), then each channel c of X is a P-weighted
sum of one column ``π(c)`` of V (several c share a column under grouped-query attention), and
for s constant on each ``{c : π(c) = j}``::

    X / s = L2(P @ L1(Y (W_v / s_v) + b_v / s_v)),    s_v[π(c)] = s_c    (exact)

π is traced, not assumed from names or head counts: one run of the model on one calibration
sample records the shapes the layout ops use (and those of V and P); then the column index
``V[..., j] = j`` is pushed through L1 in NumPy, checked constant along B's contracted axis,
carried through the MatMul (a P-weighted sum of equal indices is that index), pushed through
L2, and read off X, where it must be the same at every position. A path that fails any check
is not folded, with the reason.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper

from calibrators.data import CalibrationData
from calibrators.minmax import inference_session
from passes.ir.graph import GraphView, attribute, opset_version
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import LoadedModel
from passes.patterns import AttentionValueFold


def trace_value_channels(loaded: LoadedModel, view: GraphView, sites: list[AttentionValueFold],
                         data: CalibrationData) -> list[AttentionValueFold | str]:
    """Each site with its channel map, or the reason it cannot be folded."""
    if not sites:
        return []
    needed = _needed_tensors(view, sites)
    try:
        recorded = _record(loaded, needed, data)
    except Exception as e:  # ORT raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [f"tracing the attention layout failed ({type(e).__name__}: {first})"] * len(sites)
    out: list[AttentionValueFold | str] = []
    for site in sites:
        found = _channel_map(view, site, recorded, opset_version(loaded.proto))
        out.append(found if isinstance(found, str) else replace(site, channel_map=found))
    return out


def _needed_tensors(view: GraphView, sites: list[AttentionValueFold]) -> dict[str, str]:
    """Tensor -> what to record of it: ``"value"`` (a layout op's shape or axes operand that is
    not a constant) or ``"shape"`` (V and P, whose contents do not matter)."""
    needed: dict[str, str] = {}
    for site in sites:
        path = site.path
        needed[path.value_tensor] = "shape"
        needed[path.matmul.input[0]] = "shape"
        for node in (*path.before, *path.after):
            for extra in node.input[1:]:
                if extra and view.constant_value(extra) is None:
                    needed[extra] = "value"
    return needed


def _record(loaded: LoadedModel, needed: dict[str, str], data: CalibrationData) -> dict[str, np.ndarray]:
    """Run the model on one calibration sample; return the needed values and shapes."""
    proto = onnx.ModelProto()
    proto.CopyFrom(loaded.proto)
    del proto.graph.output[:]
    names = NameFactory.for_graph(proto.graph)
    outputs = {}
    for tensor, what in needed.items():
        if what == "shape":
            out = names.trace_shape(tensor)
            proto.graph.node.append(helper.make_node("Shape", [tensor], [out], name=names.trace_node(tensor)))
        else:
            out = tensor
        outputs[tensor] = out
        proto.graph.output.append(helper.make_empty_tensor_value_info(out))
    feed = _one_sample(proto, next(iter(data.batches())))
    values = inference_session(proto, loaded.base_dir).run(list(outputs.values()), feed)
    return dict(zip(outputs, values))


def _one_sample(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first sample of ``feed`` where every input's batch axis is free, else the whole batch."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    if all(n in dims and dims[n] and not dims[n][0].HasField("dim_value") for n in feed):
        return {n: v[:1] for n, v in feed.items()}
    return feed


def _channel_map(view: GraphView, site: AttentionValueFold, recorded: dict[str, np.ndarray],
                 opset: int) -> np.ndarray | str:
    path = site.path
    v_shape = tuple(int(d) for d in recorded[path.value_tensor])
    p_shape = tuple(int(d) for d in recorded[path.matmul.input[0]])
    columns = v_shape[-1] if v_shape else 0
    if not v_shape or columns < 1:
        return f"the value projection's output has shape {v_shape}"
    index = np.broadcast_to(np.arange(columns, dtype=np.int32), v_shape)
    try:
        b = _run_layout(view, path.before, index, recorded, opset)
    except ValueError as e:
        return f"the layout ops before the attention MatMul: {e}"
    if b.ndim < 2 or len(p_shape) < 2 or p_shape[-1] != b.shape[-2]:
        return f"{view.node_label(path.matmul)} does not contract the value's token axis " \
               f"(P {p_shape}, V as {b.shape})"
    if not np.array_equal(b, np.broadcast_to(b[..., :1, :], b.shape)):
        return f"{view.node_label(path.matmul)} would mix value channels (they vary along its contracted axis)"
    lead = np.broadcast_shapes(p_shape[:-2], b.shape[:-2])
    product = np.broadcast_to(b[..., :1, :], (*lead, p_shape[-2], b.shape[-1]))  # P @ B: one index per column
    try:
        x = _run_layout(view, path.after, product, recorded, opset)
    except ValueError as e:
        return f"the layout ops after the attention MatMul: {e}"
    if x.ndim < 1 or not np.array_equal(x, np.broadcast_to(x.reshape(-1, x.shape[-1])[0], x.shape)):
        return "the attention output's channels do not each come from one value column"
    return x.reshape(-1, x.shape[-1])[0].astype(np.int64)


def _run_layout(view: GraphView, nodes: tuple[onnx.NodeProto, ...], x: np.ndarray, recorded: dict[str, np.ndarray],
                opset: int) -> np.ndarray:
    """Apply layout ops to ``x`` with NumPy (ONNX semantics); ValueError if one cannot be replayed."""

    def operand(name: str) -> np.ndarray | None:
        if not name:
            return None
        value = view.constant_value(name)
        return np.asarray(value if value is not None else recorded[name])

    for node in nodes:
        op = node.op_type
        if op == "Identity":
            continue
        if op == "Transpose":
            perm = attribute(node, "perm")
            x = np.transpose(x, perm if perm is not None else None)
        elif op == "Reshape":
            shape = [int(d) for d in operand(node.input[1]).reshape(-1)]
            if not attribute(node, "allowzero", 0):
                shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            try:
                x = x.reshape(shape)
            except ValueError as e:
                raise ValueError(f"{view.node_label(node)}: {e}") from None
        elif op in ("Unsqueeze", "Squeeze"):
            axes = operand(node.input[1]) if opset >= 13 and len(node.input) > 1 else attribute(node, "axes")
            axes = None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
            if op == "Unsqueeze":
                rank = x.ndim + len(axes)
                x = np.expand_dims(x, tuple(sorted(a % rank for a in axes)))
            else:
                x = np.squeeze(x, None if axes is None else tuple(a % x.ndim for a in axes))
        elif op == "Expand":
            target = tuple(int(d) for d in operand(node.input[1]).reshape(-1))
            try:
                x = np.broadcast_to(x, np.broadcast_shapes(x.shape, target))
            except ValueError as e:
                raise ValueError(f"{view.node_label(node)}: {e}") from None
        else:
            raise ValueError(f"{view.node_label(node)} is not a layout op")
    return x
