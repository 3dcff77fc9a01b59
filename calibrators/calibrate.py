"""The calibration pass: one run of the FP model over the data for everything measured on it.

Per target activation the per-channel extremes (:mod:`calibrators.minmax`), and for the
activations asked for, the second moments ``G = Σ xᵀx`` GPTQ rounds against: for an activation X
with C channels on its last axis the graph gains::

    F = Reshape(Cast(X, float32), [-1, C]);     G = Gemm(F, F, transA=1) = FᵀF      ([C, C])

Both are computed inside the graph, so only ``[C]`` vectors and ``[C, C]`` sums leave the
session; batches are summed in float32 (ORT's own precision for each product). Measuring ``G``
here, on the FP model, instead of in a pass of its own over the smoothed model saves a whole
pass over the data: smoothing changes it by a known diagonal
(:class:`calibrators.gram.SmoothedHessians`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from calibrators.data import CalibrationData, model_inputs
from calibrators.minmax import StatTarget, build_calibration_graph, inference_session
from calibrators.stats import ChannelStats
from passes.ir.errors import SmoothQuantError
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import LoadedModel


@dataclass
class Calibration:
    stats: ChannelStats
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # activation -> float32 Σ xᵀx (may be non-finite)


def add_gram_nodes(graph: onnx.GraphProto, names: NameFactory, tensor: str, channels: int) -> str:
    """Append ``Gemm(F, F, transA=1)`` (``F = Reshape(Cast(tensor, float32), [-1, C])``) to ``graph``
    as a new output; returns the output's name."""
    def t(tag: str) -> str:
        return names.unique(f"{tensor}::sq_gram_{tag}")

    shape, x32, flat = t("shape"), t("f32"), t("flat")
    gram = names.gram_output(tensor)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, channels], dtype=np.int64), shape))
    graph.node.extend([
        helper.make_node("Cast", [tensor], [x32], name=names.unique(f"{x32}::node"), to=onnx.TensorProto.FLOAT),
        helper.make_node("Reshape", [x32, shape], [flat], name=names.unique(f"{flat}::node")),
        helper.make_node("Gemm", [flat, flat], [gram], name=names.amax_node(tensor, "gram"), transA=1),
    ])
    graph.output.append(helper.make_empty_tensor_value_info(gram))
    return gram


def calibrate(model: LoadedModel, targets: Sequence[StatTarget], data: CalibrationData, *,
              grams: Mapping[str, int] | None = None, proto: onnx.ModelProto | None = None,
              initializers: Sequence[onnx.TensorProto] = (), prepack: bool = True, progress: bool = True,
              providers: Sequence[str] = ("CPUExecutionProvider",)) -> Calibration:
    """Run ``model`` over ``data``: per-channel extremes of every target activation and, for each
    activation in ``grams`` (name -> channels on its last axis), ``Σ xᵀx`` over its rows.

    ``proto``: the graph to run instead of ``model.proto`` (a snapshot), ``initializers``: tensors
    already split off it (:func:`calibrators.minmax.split_large_inline`); ``prepack=False``: ORT
    keeps no pre-packed copy of the weights (less memory, slower GEMMs)."""
    grams = dict(grams or {})
    proto = model.proto if proto is None else proto
    if not targets and not grams:
        return Calibration(ChannelStats())
    data.check(model_inputs(proto))
    calib, outputs, big = build_calibration_graph(proto, targets)
    if not targets:
        del calib.graph.output[:]  # second moments only
    names = NameFactory.for_graph(calib.graph)
    gram_outputs = {t: add_gram_nodes(calib.graph, names, t, c) for t, c in grams.items()}
    fetch = [name for t in targets for name in outputs[t.tensor]]
    stats, sums = ChannelStats(), {}
    # Every gram hangs a branch off its activation: run each soon after it (not at the end, all alive).
    session = inference_session(calib, model.base_dir, providers, [*big, *initializers],
                                early_consumers=bool(grams), prepack=prepack)
    # ORT writes each batch's products into these buffers: no [C, C] allocation per batch.
    products = {t: np.empty((c, c), dtype=np.float32) for t, c in grams.items()}
    binding = session.io_binding()
    for name in fetch:
        binding.bind_output(name, "cpu")
    for t, buffer in products.items():
        binding.bind_output(gram_outputs[t], "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    what = "calibrating" if targets else "input second moments"
    bar = tqdm(data.batches(), total=data.num_batches(), desc=what, unit="batch", disable=not progress, leave=False)
    batches = 0
    for feed in bar:
        batches += 1
        inputs = {name: np.ascontiguousarray(value) for name, value in feed.items()}  # alive until the run ends
        try:
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            session.run_with_iobinding(binding)
        except Exception as e:  # ORT raises its own exception types
            doing = "on a calibration batch" if targets else "while measuring input second moments"
            raise SmoothQuantError(f"{model.path}: ONNX Runtime failed {doing}: {e}") from None
        ranges = [v.numpy() for v in binding.get_outputs()[:len(fetch)]]
        for target, lo, hi in zip(targets, ranges[0::2], ranges[1::2]):
            if lo.shape != (target.channels,) or hi.shape != (target.channels,):
                raise SmoothQuantError(
                    f"{model.path}: activation {target.tensor!r} gave {hi.shape} channel statistics, "
                    f"expected ({target.channels},)"
                )
            stats.update(target.tensor, np.maximum(hi, -lo), target.channel_axis, minimum=lo, maximum=hi)
        for tensor, product in products.items():
            if tensor in sums:
                sums[tensor] += product  # non-finite sums stay so: GPTQ reports and skips them
            else:
                sums[tensor] = product.copy()
        stats.num_samples += len(next(iter(feed.values()))) if feed else 0
    if batches == 0 and not targets:
        raise SmoothQuantError(f"{data.description}: no calibration batches left to measure input second "
                               f"moments (an iterator can be read only once)")
    if stats.num_samples == 0:
        raise SmoothQuantError(f"{data.description}: calibration set is empty (0 samples)")
    bad = [t.tensor for t in targets if not np.isfinite(stats.amax[t.tensor]).all()]
    if bad:
        raise SmoothQuantError(f"{model.path}: activation {bad[0]!r} is NaN or Inf on the calibration data"
                               + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                               + ": the model itself computes non-finite values there")
    return Calibration(stats, sums)


def collect_channel_stats(model: LoadedModel, targets: Sequence[StatTarget], data: CalibrationData, *,
                          progress: bool = True,
                          providers: Sequence[str] = ("CPUExecutionProvider",)) -> ChannelStats:
    """Run ``model`` over ``data`` and return per-channel extremes of every target activation."""
    return calibrate(model, targets, data, progress=progress, providers=providers).stats


def collect_grams(model: LoadedModel, proto: onnx.ModelProto, channels: Mapping[str, int], data: CalibrationData,
                  *, progress: bool = True, initializers: Sequence[onnx.TensorProto] = ()) -> dict[str, np.ndarray]:
    """``Σ xᵀx`` (float32 ``[C, C]``) over every calibration row of each activation in ``channels``
    (non-finite where the activation held inf or NaN), running ``proto`` (its weights not
    pre-packed). ``initializers``: tensors already split off ``proto``."""
    if not channels:
        return {}
    return calibrate(model, [], data, grams=channels, proto=proto, initializers=initializers, prepack=False,
                     progress=progress).grams
