"""Per-layer sensitivity: linear ops' own quantization error, measured inside the graph.

Every measurement is a :class:`Twin`: one op ``Y = f(X, W)`` under one trial (smoothing scales
s, outlier channels O split off to FP, the activation range of ``X / s``). The measuring graph
keeps the FP op and adds, per twin, a quantized copy reading the same FP input, so errors do
not pile up from layer to layer::

    Y~  = f(DQ(Q(X / s)), DQ(quant(s W[:, C])))   (the Q/DQ the output model would have, on a
                                                   subset C of the output channels)
    e_t = |Y~_t - Y_t[C]|² / (|Y_t[C]|² + tiny)   per token t (row of output channels)
    e   = Σ_t e_t,  n = number of tokens          two scalars per twin and batch

Only scalars leave the session. Every token weighs the same: a token with a 100x outlier
does not drown the error of the others, as a plain ``|Y~ - Y|² / |Y|²`` would. Over the
measured tokens a twin's relative error is ``Σ e / Σ n`` and ``SQNR = -10 log10`` of it.

Cost. All twins share one graph, so one pass over the data serves every candidate of a
search (one pass per chunk of groups where the twins' weights exceed :data:`TWIN_BUDGET_BYTES`).
Weights are quantized per output channel, so the columns of ``Y~`` are independent given
``Q(X)``: in a search a twin computes an evenly spaced subset C of them (:func:`columns_to_sample`:
``max(128, N / 8)`` of N), an unbiased sample of the summed error at a fraction of the GEMM.
``max_tokens`` stops the pass once that many tokens have been measured (a search needs far
fewer tokens than calibration's ranges do).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from calibrators.data import CalibrationData, model_inputs
from calibrators.minmax import inference_session
from passes.config import Granularity, QuantizationConfig, Target
from passes.ir.errors import SmoothQuantError
from passes.ir.graph import GraphView, make_reduce
from passes.linear import LinearKind, LinearOp
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import LoadedModel, TensorStore
from passes.qdq import ActivationRange, quantize_linear_ops
from passes.split import split_outliers

# An op is "far above the rest" when its error energy exceeds this multiple of the median op's.
OUTLIER_FACTOR = 4.0
MIN_COLUMNS = 128  # a twin computes at least this many output channels (all, if the op has fewer)
COLUMN_FRACTION = 8  # ... and at least 1/COLUMN_FRACTION of them


@dataclass(frozen=True)
class LayerError:
    name: str  # the linear op's node name
    error: float  # Σ over measured tokens of |Y~_t - Y_t|² / |Y_t|²
    reference: float  # number of tokens

    @property
    def relative(self) -> float:
        return self.error / self.reference if self.reference > 0 else float("inf")

    @property
    def sqnr_db(self) -> float:
        rel = self.relative
        return float("inf") if rel == 0 else float(10 * np.log10(1 / rel))


@dataclass(frozen=True)
class Twin:
    """One measurement: ``op`` quantized with its input range ``range`` (of ``X / scales``),
    optionally smoothed by ``scales`` (not folded: the twin reads ``X * (1/s)`` and ``s W``) or
    with the input channels ``split`` computed in FP. ``key`` names the result."""

    op: LinearOp
    key: Hashable
    range: ActivationRange
    scales: np.ndarray | None = None
    split: np.ndarray | None = None
    trial: Hashable = None  # twins of one trial and activation share their smoothed input


def columns_to_sample(n: int) -> np.ndarray | None:
    """The output channels a twin computes: evenly spaced, ``max(MIN_COLUMNS, n / COLUMN_FRACTION)``
    of ``n``; None: all of them."""
    m = max(MIN_COLUMNS, n // COLUMN_FRACTION)
    return None if m >= n else (np.arange(m, dtype=np.int64) * n) // m


def measure_twins(model: LoadedModel, proto: onnx.ModelProto, twins: Sequence[Twin], opset: int,
                  config: QuantizationConfig, data: CalibrationData, *, max_tokens: int | None = None,
                  sample_columns: bool = False, desc: str = "measuring layer errors",
                  progress: bool = True) -> dict[Hashable, LayerError]:
    """The quantized-output error of every twin on ``data`` (ops are nodes of ``proto``), in one pass;
    ``sample_columns``: on a subset of each op's output channels (:func:`columns_to_sample`).
    Twins whose range is unusable (or whose op the quantizer skips) are left out of the result."""
    if not twins:
        return {}
    data.check(model_inputs(proto))
    work = copy.deepcopy(proto)
    graph = work.graph
    view = GraphView(graph, TensorStore(model))
    names = NameFactory.for_graph(graph)
    position = {id(n): i for i, n in enumerate(proto.graph.node)}
    after: dict[int, list[onnx.NodeProto]] = {}  # original position -> nodes inserted right after it
    first_reader: dict[tuple, int] = {}  # (activation, trial) -> position of its first reader
    for twin in twins:
        key = (twin.op.activation, twin.trial)
        first_reader[key] = min(first_reader.get(key, len(position)), position[id(twin.op.node)])
    smoothed: dict[tuple, str] = {}  # (activation, trial) -> X * (1/s)
    built = []  # (twin, twin node name, err output, ref output)
    for twin in twins:
        pos = position[id(twin.op.node)]
        original = proto.graph.node[pos]
        node = copy.deepcopy(original)
        node.name = names.unique(f"{original.name or original.output[0]}::sq_quantized_twin")
        del node.output[:]
        node.output.append(names.unique(f"{original.output[0]}::sq_quantized"))
        if twin.scales is not None:  # the Mul goes right after the first reader, before every twin reading it
            node.input[0] = _smoothed_input(view, names, twin, smoothed,
                                            after.setdefault(first_reader[(twin.op.activation, twin.trial)], []))
        inserted = after.setdefault(pos, [])
        columns = _twin_weight(view, names, twin, node, sample_columns)
        reference = original.output[0]
        if columns is not None:
            index = names.unique(f"{reference}::sq_columns")
            view.set_initializer(index, columns)
            reference = names.unique(f"{reference}::sq_sampled")
            inserted.append(helper.make_node("Gather", [original.output[0], index], [reference], axis=-1,
                                             name=names.unique(f"{reference}::node")))
        inserted.append(node)
        channel_axis = 1 if twin.op.kind is LinearKind.CONV else -1
        err, ref = _token_error_nodes(names, reference, node.output[0], channel_axis, opset, view, inserted)
        built.append((twin, node.name, err, ref))
    view.insert([(node, graph.node[pos]) for pos, nodes in after.items() for node in nodes], after=True)
    view.rebuild()
    by_name = {n.name: n for n in graph.node}  # the graph's own copies of the twins
    ops = [(t, replace(t.op, node=by_name[name], activation=by_name[name].input[0], weight=by_name[name].input[1]),
            err, ref) for t, name, err, ref in built]
    splits: dict[tuple, tuple[Twin, list[LinearOp]]] = {}  # (activation, trial) -> a twin, the split twins
    for t, op, _, _ in ops:
        if t.split is not None and len(t.split):
            splits.setdefault((t.op.activation, t.trial), (t, []))[1].append(op)
    for t, members in splits.values():  # twins' outputs feed only their error nodes
        # members read X, or X * (1/s) with scales: the channels are the same
        split_outliers(view, members, members[0].activation, t.split, names, tidy=False)
    if splits:
        view.rebuild()
        view.drop_unused_initializers()
    quantized = _quantize_twins(view, ops, opset, config)
    fetch = [(t.key, err, ref) for t, op, err, ref in ops if op.name in quantized]
    del graph.output[:]
    for _, err, ref in fetch:
        graph.output.extend([helper.make_empty_tensor_value_info(err), helper.make_empty_tensor_value_info(ref)])
    if not fetch:
        return {}
    session = inference_session(work, model.base_dir, early_consumers=True)  # SmolLM2, batch 4: 3.6 -> 2.9 GB peak
    totals = np.zeros((len(fetch), 2), dtype=np.float64)
    wanted = [name for _, err, ref in fetch for name in (err, ref)]
    bar = tqdm(data.batches(), total=data.num_batches(), desc=desc, unit="batch", disable=not progress, leave=False)
    batches = 0
    for feed in bar:
        batches += 1
        try:
            values = session.run(wanted, feed)
        except Exception as e:  # ORT raises its own exception types
            raise SmoothQuantError(f"{model.path}: ONNX Runtime failed while measuring layer errors: {e}") from None
        totals += np.asarray(values, dtype=np.float64).reshape(-1, 2)
        if max_tokens is not None and totals[:, 1].min() >= max_tokens:
            break
    bar.close()
    if batches == 0:
        raise SmoothQuantError(f"{data.description}: no calibration batches left to measure layer errors "
                               f"(an iterator can be read only once)")
    return {key: LayerError(name_of(key), float(e), float(r)) for (key, _, _), (e, r) in zip(fetch, totals)}


def name_of(key: Hashable) -> str:
    return key if isinstance(key, str) else str(key[0]) if isinstance(key, tuple) else str(key)


def _quantize_twins(view: GraphView, ops: list, opset: int, config: QuantizationConfig) -> set[str]:
    """Q/DQ (or per-token lowering) on the twins, one call per input tensor's range; names quantized."""
    per_token = config.granularity is Granularity.PER_TOKEN
    if per_token:  # the standard-op lowering: the same numbers as the TensorRT plugins
        from passes.per_token import quantize_per_token  # noqa: PLC0415 - per_token imports qdq

        report = quantize_per_token(view, [op for _, op, _, _ in ops], opset, replace(config, target=Target.ONNXRUNTIME))
        return set(report.quantized)
    # Twins reading one tensor under different ranges (no smoothing vs a split) need separate calls.
    batches: list[tuple[dict[str, ActivationRange], list[LinearOp]]] = []
    for t, op, _, _ in ops:
        x = op.node.input[0]
        for ranges, members in batches:
            if ranges.get(x, t.range) == t.range:
                ranges[x] = t.range
                members.append(op)
                break
        else:
            batches.append(({x: t.range}, [op]))
    done = set()
    for ranges, members in batches:
        done.update(quantize_linear_ops(view, members, ranges, opset, config).quantized)
    return done


def _smoothed_input(view: GraphView, names: NameFactory, twin: Twin, made: dict[tuple, str],
                    nodes: list[onnx.NodeProto]) -> str:
    """``X * (1/s)`` for the twin's activation and trial, made once (the Mul goes after the first reader)."""
    key = (twin.op.activation, twin.trial)
    if key not in made:
        s = twin.scales
        x = names.unique(f"{twin.op.activation}::sq_trial_smoothed")
        weight = view.store.proto(view.constant_source(twin.op.node.input[1]))
        shape = (s.size,) if twin.op.activation_channel_axis == -1 else (s.size,) + (1,) * (len(weight.dims) - 2)
        inv = names.unique(f"{x}::inv_scale")
        view.set_initializer(inv, (1.0 / s).reshape(shape).astype(helper.tensor_dtype_to_np_dtype(weight.data_type)))
        nodes.append(helper.make_node("Mul", [twin.op.activation, inv], [x], name=names.unique(f"{x}::mul")))
        made[key] = x
    return made[key]


def _twin_weight(view: GraphView, names: NameFactory, twin: Twin, node: onnx.NodeProto,
                 sample: bool) -> np.ndarray | None:
    """Point ``node`` at its own weight ``s W`` restricted to the sampled output channels (and its
    bias, for Gemm); returns those channels (None: all)."""
    op = twin.op
    w = view.store.array(view.constant_source(node.input[1]))  # the weight now (a pass may have replaced op.weight)
    columns = None if op.kind is LinearKind.CONV or not sample else columns_to_sample(w.shape[op.weight_out_axis])
    bias = view.constant_value(node.input[2]) if op.kind is LinearKind.GEMM and len(node.input) > 2 \
        and node.input[2] else None
    if columns is not None and bias is not None and bias.size > 1 and bias.shape != (w.shape[op.weight_out_axis],):
        columns = None  # a bias of another shape: keep every column
    if twin.scales is not None:
        shape = [1] * w.ndim
        shape[op.weight_in_axis] = twin.scales.size
        w = (w.astype(np.float64) * twin.scales.reshape(shape)).astype(w.dtype)
    if columns is not None:
        w = np.take(w, columns, axis=op.weight_out_axis)
        if bias is not None and bias.size > 1:
            node.input[2] = names.unique(f"{node.name}::bias")
            view.set_initializer(node.input[2], np.ascontiguousarray(bias[columns]))
    if twin.scales is not None or columns is not None:
        node.input[1] = names.unique(f"{node.name}::weight")
        view.set_initializer(node.input[1], np.ascontiguousarray(w))
    return columns


def _token_error_nodes(names: NameFactory, y: str, yq: str, channel_axis: int, opset: int, view: GraphView,
                       nodes: list[onnx.NodeProto]) -> tuple[str, str]:
    """Appends the nodes computing (Σ_t e_t, n) for ``y`` (FP) and ``yq`` (quantized), in float32."""
    def t(tag: str) -> str:
        return names.unique(f"{y}::sq_{tag}")

    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=names.unique(f"{out}::node"), **attrs)

    def add_axes(value: np.ndarray) -> str:
        name = t("axes")
        view.set_initializer(name, value)
        return name

    def reduce(op: str, inp: str, out: str, axes: list[int]) -> onnx.NodeProto:
        return make_reduce(op, inp, out, axes, opset, names.unique(f"{out}::node"), 0, add_axes)

    y32, yq32, diff, e_rows, r_rows, r_safe, rel, err, ones, ref = (
        t(x) for x in ("y32", "yq32", "diff", "e_rows", "r_rows", "r_safe", "rel", "err", "ones", "ref"))
    tiny = t("tiny")
    view.set_initializer(tiny, np.array(1e-30, dtype=np.float32))
    nodes += [node("Cast", [y], y32, to=onnx.TensorProto.FLOAT),
              node("Cast", [yq], yq32, to=onnx.TensorProto.FLOAT),
              node("Sub", [yq32, y32], diff),
              reduce("ReduceSumSquare", diff, e_rows, [channel_axis]),
              reduce("ReduceSumSquare", y32, r_rows, [channel_axis]),
              node("Add", [r_rows, tiny], r_safe),
              node("Div", [e_rows, r_safe], rel),
              node("ReduceSum", [rel], err, keepdims=0),
              node("Size", [rel], ones),
              node("Cast", [ones], ref, to=onnx.TensorProto.FLOAT)]
    return err, ref


def measure_layer_errors(model: LoadedModel, proto: onnx.ModelProto, ops: Sequence[LinearOp],
                         ranges: dict[str, ActivationRange], opset: int, config: QuantizationConfig,
                         data: CalibrationData, *, progress: bool = True) -> list[LayerError]:
    """Quantization error of every op in ``ops`` (nodes of ``proto``, ``ranges`` keyed by their
    inputs) on ``data``, in graph order; ops without a usable range are left out."""
    twins = [Twin(op, op.name, ranges[op.node.input[0]]) for op in ops if op.node.input[0] in ranges]
    measured = measure_twins(model, proto, twins, opset, config, data, progress=progress)
    return [measured[op.name] for op in ops if op.name in measured]


@dataclass(frozen=True)
class Trial:
    """One candidate for one group: smoothing scales to try (None: none) and the range of X / s;
    or, with ``split``, the outlier channels to compute in FP (and the range of the others)."""

    scales: np.ndarray | None
    range: ActivationRange
    split: np.ndarray | None = None


def measure_group_candidates(model: LoadedModel, proto: onnx.ModelProto, groups: Sequence,
                             candidates: Mapping[str, Sequence], trial, opset: int, config: QuantizationConfig,
                             data: CalibrationData, *, desc: str, max_tokens: int | None = None,
                             sample_columns: bool = True, progress: bool = True,
                             budget: int | None = None) -> dict[str, dict[object, float]]:
    """``E_G(c)``: the sum of the relative quantized-output errors of group G's ops under each
    candidate c of ``candidates[G.activation]`` (``trial(G, c)`` says what c is). Every candidate of
    every group is measured in one pass over ``data`` while their twins' weights fit in ``budget``
    bytes (None: :data:`TWIN_BUDGET_BYTES`); beyond it, in a pass per chunk of groups (twins are
    independent: the chunks give the same numbers). Ops whose range is unusable count as inf."""
    budget = TWIN_BUDGET_BYTES if budget is None else budget
    dims = {t.name: [int(d) for d in t.dims] for t in proto.graph.initializer}
    chunks, size = [[]], 0
    for g in groups:
        cost = len(candidates[g.activation]) * sum(twin_weight_bytes(op, dims.get(op.weight, [0, 0]), sample_columns)
                                                   for op in g.consumers)
        if chunks[-1] and size + cost > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += cost
    measured = {}
    for i, chunk in enumerate(chunks):
        twins = []
        for g in chunk:
            for c in candidates[g.activation]:
                t = trial(g, c)
                twins += [Twin(op, (op.name, c), t.range, t.scales, t.split, c) for op in g.consumers]
        measured.update(measure_twins(model, proto, twins, opset, config, data, max_tokens=max_tokens,
                                      sample_columns=sample_columns, progress=progress,
                                      desc=desc if len(chunks) == 1 else f"{desc} ({i + 1}/{len(chunks)})"))
    return {g.activation: {c: float(sum(measured[(op.name, c)].relative if (op.name, c) in measured else np.inf
                                        for op in g.consumers)) for c in candidates[g.activation]} for g in groups}


# Twins' weights per measuring pass (SmolLM2 INT8: 2 passes, 61 s and 3.2 GB, against one: 66 s, 4.4 GB).
TWIN_BUDGET_BYTES = 512 << 20


def twin_weight_bytes(op: LinearOp, dims: list[int], sample_columns: bool) -> int:
    """The float32 weight (of shape ``dims``) one twin of ``op`` holds: its sampled output channels."""
    if op.kind is LinearKind.CONV or not sample_columns:
        return 4 * int(np.prod(dims))
    n = dims[op.weight_out_axis]
    columns = columns_to_sample(n)
    return 4 * int(np.prod(dims)) // max(n, 1) * (n if columns is None else len(columns))


def choose_fp_layers(errors: Sequence[LayerError], max_fp_layers: int,
                     factor: float = OUTLIER_FACTOR) -> list[LayerError]:
    """Up to ``max_fp_layers`` ops, worst first, whose relative error exceeds ``factor`` x the median."""
    if max_fp_layers <= 0 or not errors:
        return []
    median = float(np.median([e.relative for e in errors]))
    worst = sorted(errors, key=lambda e: e.relative, reverse=True)
    return [e for e in worst[:max_fp_layers] if e.relative > factor * median]
