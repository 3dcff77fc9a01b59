"""Per-layer sensitivity: each linear op's own quantization error, measured inside the graph.

For every candidate op ``Y = f(X, W)`` the measuring graph keeps the FP op and adds a
quantized twin reading the same FP input, so errors do not pile up from layer to layer::

    Y~  = f(DQ(Q(X / s)), DQ(quant(s * W)))     (the Q/DQ the output model will have; s = 1
                                                 unless candidate smoothing scales are given)
    e_t = |Y~_t - Y_t|² / (|Y_t|² + tiny)       per token t (row of output channels)
    e   = Σ_t e_t,  n = number of tokens         two scalars per op and batch

Only scalars leave the session. Every token weighs the same (a token with a 100x outlier
does not drown the error of the others, as a plain |Y~ - Y|² / |Y|² would). Over the
calibration set the op's relative error is ``Σ e / Σ n`` and ``SQNR = -10 log10`` of it.
:func:`choose_fp_layers` keeps in FP the ops whose error is far above the rest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from calibrators.data import CalibrationData, model_inputs
from calibrators.minmax import inference_session
from passes.config import QuantizationConfig
from passes.errors import SmoothQuantError
from passes.graph import GraphView, make_reduce
from passes.linear import LinearKind, LinearOp
from passes.naming import NameFactory
from passes.onnx_io import LoadedModel, TensorStore
from passes.qdq import ActivationRange, quantize_linear_ops
from passes.split import split_outliers

# An op is "far above the rest" when its error energy exceeds this multiple of the median op's.
OUTLIER_FACTOR = 4.0


@dataclass(frozen=True)
class LayerError:
    name: str  # the linear op's node name
    error: float  # Σ over calibration tokens of |Y~_t - Y_t|² / |Y_t|²
    reference: float  # number of tokens

    @property
    def relative(self) -> float:
        return self.error / self.reference if self.reference > 0 else float("inf")

    @property
    def sqnr_db(self) -> float:
        rel = self.relative
        return float("inf") if rel == 0 else float(10 * np.log10(1 / rel))


def measure_layer_errors(model: LoadedModel, proto: onnx.ModelProto, ops: Sequence[LinearOp],
                         ranges: dict[str, ActivationRange], opset: int, config: QuantizationConfig,
                         data: CalibrationData, *, progress: bool = True,
                         trial_scales: dict[str, np.ndarray] | None = None,
                         trial_splits: dict[str, np.ndarray] | None = None) -> list[LayerError]:
    """Quantization error of every op in ``ops`` (nodes of ``proto``) on ``data``.

    ``trial_scales`` maps an op's activation to smoothing scales ``s`` to try without folding
    (the twin reads ``X * (1/s)`` and ``s * W``); ``ranges`` must then hold the range of ``X / s``
    under the key :func:`trial_input` names. ``trial_splits`` maps an activation to outlier
    channels to try splitting off to FP (:mod:`passes.split`; the twin becomes the split form,
    ``ranges`` holds the range of the other channels).
    """
    if not ops:
        return []
    data.check(model_inputs(proto))
    work = copy.deepcopy(proto)
    graph = work.graph
    index = {id(n): i for i, n in enumerate(proto.graph.node)}
    names = NameFactory.for_graph(graph)
    twins, fetch = [], []
    # Insert from the back so earlier positions stay valid.
    for op in sorted(ops, key=lambda o: index[id(o.node)], reverse=True):
        pos = index[id(op.node)]
        original = graph.node[pos]
        twin = copy.deepcopy(original)
        twin.name = names.unique(f"{original.name or original.output[0]}::sq_quantized_twin")
        del twin.output[:]
        twin.output.append(names.unique(f"{original.output[0]}::sq_quantized"))
        y, yq = original.output[0], twin.output[0]
        channel_axis = 1 if op.kind is LinearKind.CONV else -1
        extra, err, ref = _token_error_nodes(names, twin, y, yq, channel_axis, opset, graph)
        for k, node in enumerate(extra):
            graph.node.insert(pos + 1 + k, node)
        twins.append(replace(op, node=graph.node[pos + 1]))
        fetch.append((op.name, err, ref))
    view = GraphView(graph, TensorStore(model))  # rebuild() points the store at the copy
    if trial_scales:
        twins = [_apply_trial_scale(view, twin, trial_scales[twin.activation])
                 if twin.activation in trial_scales else twin for twin in twins]
        view.rebuild()
    for twin in twins:
        if twin.activation in (trial_splits or {}):
            split_outliers(view, [twin], twin.activation, trial_splits[twin.activation], names)
    report = quantize_linear_ops(view, twins, ranges, opset, config)
    if report.skipped:
        skipped = {name for name, _ in report.skipped}
        fetch = [f for f, op in zip(fetch, twins) if op.name not in skipped]
    del graph.output[:]
    for _, err, ref in fetch:
        graph.output.extend([helper.make_empty_tensor_value_info(err), helper.make_empty_tensor_value_info(ref)])
    session = inference_session(work, model.base_dir, early_consumers=True)  # SmolLM2, batch 4: 3.6 -> 2.9 GB peak
    totals = np.zeros((len(fetch), 2), dtype=np.float64)
    bar = tqdm(data.batches(), total=data.num_batches(), desc="measuring layer errors", unit="batch",
               disable=not progress, leave=False)
    wanted = [name for _, err, ref in fetch for name in (err, ref)]
    batches = 0
    for feed in bar:
        batches += 1
        try:
            values = session.run(wanted, feed)
        except Exception as e:  # ORT raises its own exception types
            raise SmoothQuantError(f"{model.path}: ONNX Runtime failed while measuring layer errors: {e}") from None
        totals += np.asarray(values, dtype=np.float64).reshape(-1, 2)
    if batches == 0:
        raise SmoothQuantError(f"{data.description}: no calibration batches left to measure layer errors "
                               f"(an iterator can be read only once)")
    # Report in graph order.
    return [LayerError(name, float(e), float(r)) for (name, _, _), (e, r) in reversed(list(zip(fetch, totals)))]


@dataclass(frozen=True)
class Trial:
    """One candidate for one group: smoothing scales to try (None: none) and the range of X / s;
    or, with ``split``, the outlier channels to compute in FP (and the range of the others)."""

    scales: np.ndarray | None
    range: ActivationRange
    split: np.ndarray | None = None


def measure_group_candidates(model: LoadedModel, proto: onnx.ModelProto, groups: Sequence, candidates: Sequence,
                             trial: Callable[[object, object], Trial], opset: int, config: QuantizationConfig,
                             data: CalibrationData, *, desc: str,
                             progress: bool = True) -> dict[str, dict[object, float]]:
    """``E_G(c)``: the sum of relative quantized-output errors of group G's ops under candidate c.

    One pass over ``data`` per candidate; ops whose activation range is unusable count as inf.
    """
    ops = [op for g in groups for op in g.consumers]
    errors: dict[str, dict[object, float]] = {g.activation: {} for g in groups}
    for c in tqdm(candidates, desc=desc, unit="candidate", disable=not progress, leave=False):
        scales, ranges, splits = {}, {}, {}
        for g in groups:
            t = trial(g, c)
            if t.scales is None:
                ranges[g.activation] = t.range
                if t.split is not None and len(t.split):
                    splits[g.activation] = t.split
            else:
                scales[g.activation] = t.scales
                ranges[trial_input(g.activation)] = t.range
        measured = {e.name: e.relative for e in measure_layer_errors(model, proto, ops, ranges, opset, config, data,
                                                                     progress=False, trial_scales=scales,
                                                                     trial_splits=splits)}
        for g in groups:
            errors[g.activation][c] = float(sum(measured.get(op.name, np.inf) for op in g.consumers))
    return errors


def _token_error_nodes(names: NameFactory, twin: onnx.NodeProto, y: str, yq: str, channel_axis: int, opset: int,
                       graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes computing (Σ_t e_t, n) for outputs ``y`` (FP) and ``yq`` (quantized twin), in float32."""
    def t(tag: str) -> str:
        return names.unique(f"{y}::sq_{tag}")

    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=names.unique(f"{out}::node"), **attrs)

    def add_axes(value: np.ndarray) -> str:
        graph.initializer.append(onnx.numpy_helper.from_array(value, t("axes")))
        return graph.initializer[-1].name

    def reduce(op: str, inp: str, out: str, axes: list[int]) -> onnx.NodeProto:
        return make_reduce(op, inp, out, axes, opset, names.unique(f"{out}::node"), 0, add_axes)

    y32, yq32, diff, e_rows, r_rows, r_safe, rel, err, ones, ref = (
        t(x) for x in ("y32", "yq32", "diff", "e_rows", "r_rows", "r_safe", "rel", "err", "ones", "ref"))
    tiny = t("tiny")
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1e-30, dtype=np.float32), tiny))
    nodes = [twin,
             node("Cast", [y], y32, to=onnx.TensorProto.FLOAT),
             node("Cast", [yq], yq32, to=onnx.TensorProto.FLOAT),
             node("Sub", [yq32, y32], diff),
             reduce("ReduceSumSquare", diff, e_rows, [channel_axis]),
             reduce("ReduceSumSquare", y32, r_rows, [channel_axis]),
             node("Add", [r_rows, tiny], r_safe),
             node("Div", [e_rows, r_safe], rel),
             node("ReduceSum", [rel], err, keepdims=0),
             node("Size", [rel], ones),
             node("Cast", [ones], ref, to=onnx.TensorProto.FLOAT)]
    return nodes, err, ref


def trial_input(activation: str) -> str:
    """Name of the twin input ``X * (1/s)`` for trial scales (unique enough inside the scratch graph)."""
    return f"{activation}::sq_trial_smoothed"


def _apply_trial_scale(view: GraphView, twin: LinearOp, s: np.ndarray) -> LinearOp:
    """Point ``twin`` at ``X * (1/s)`` and at a private copy of its weight times ``s``."""
    x = trial_input(twin.activation)
    if x not in view.initializers and x not in {o for n in view.graph.node for o in n.output}:
        shape = (s.size,) if twin.activation_channel_axis == -1 else (s.size,) + (1,) * (_rank(view, twin) - 2)
        inv = f"{x}::inv_scale"
        dtype = view.store.array(twin.weight).dtype
        view.set_initializer(inv, (1.0 / s).reshape(shape).astype(dtype))
        pos = list(view.graph.node).index(twin.node)
        view.graph.node.insert(pos, helper.make_node("Mul", [twin.activation, inv], [x], name=f"{x}::mul"))
    w = view.store.array(twin.weight)
    shape = [1] * w.ndim
    shape[twin.weight_in_axis] = s.size
    scaled = f"{twin.node.name}::trial_weight"
    view.set_initializer(scaled, (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype))
    twin.node.input[0] = x
    twin.node.input[1] = scaled
    return replace(twin, activation=x, weight=scaled)


def _rank(view: GraphView, op: LinearOp) -> int:
    return len(view.store.proto(op.weight).dims)


def choose_fp_layers(errors: Sequence[LayerError], max_fp_layers: int,
                     factor: float = OUTLIER_FACTOR) -> list[LayerError]:
    """Up to ``max_fp_layers`` ops, worst first, whose relative error exceeds ``factor`` x the median."""
    if max_fp_layers <= 0 or not errors:
        return []
    median = float(np.median([e.relative for e in errors]))
    worst = sorted(errors, key=lambda e: e.relative, reverse=True)
    return [e for e in worst[:max_fp_layers] if e.relative > factor * median]

