"""Input second moments of linear ops, ``H = Σ_x xᵀx``, computed inside the graph by ONNX Runtime.

For every requested activation X with C channels on its last axis the measuring graph gains::

    F = Reshape(Cast(X, float32), [-1, C]);     G = Gemm(F, F, transA=1) = FᵀF      ([C, C])

so one ``[C, C]`` matrix per activation and batch leaves the session, never the activation
itself; batches are summed in place in float32 (ORT's own precision for each product).
Error-compensating weight rounding (:mod:`passes.gptq`) needs these. Memory: ``4 C²`` bytes
per activation for the sums and about as much again for one batch's outputs;
:class:`WeightHessians` keeps that under a budget by measuring a chunk of activations per pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from calibrators.data import CalibrationData, model_inputs
from calibrators.minmax import inference_session, split_large_inline
from passes.ir.errors import SmoothQuantError
from passes.ir.naming import NameFactory
from passes.ir.onnx_io import LoadedModel


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


def build_gram_graph(proto: onnx.ModelProto, channels: Mapping[str, int]
                     ) -> tuple[onnx.ModelProto, dict[str, str], list[onnx.TensorProto]]:
    """A copy of ``proto`` whose outputs are ``XᵀX`` per activation in ``channels`` (name -> C),
    the output name per activation, and the large initializers left out of the copy."""
    out, big = split_large_inline(proto)
    names = NameFactory.for_graph(out.graph)
    del out.graph.output[:]
    return out, {tensor: add_gram_nodes(out.graph, names, tensor, c) for tensor, c in channels.items()}, big


def collect_grams(model: LoadedModel, proto: onnx.ModelProto, channels: Mapping[str, int], data: CalibrationData,
                  *, progress: bool = True, initializers: Sequence[onnx.TensorProto] = ()) -> dict[str, np.ndarray]:
    """``Σ xᵀx`` (float32 ``[C, C]``) over every calibration row of each activation in ``channels``
    (non-finite where the activation held inf or NaN). ``initializers``: tensors already split
    off ``proto`` (see :func:`calibrators.minmax.split_large_inline`)."""
    if not channels:
        return {}
    data.check(model_inputs(proto))
    work, outputs, big = build_gram_graph(proto, channels)
    session = inference_session(work, model.base_dir, initializers=[*big, *initializers], early_consumers=True,
                                prepack=False)
    # ORT writes each batch's products into these buffers (no output allocation per run).
    products = {t: np.empty((c, c), dtype=np.float32) for t, c in channels.items()}
    binding = session.io_binding()
    for t, buffer in products.items():
        binding.bind_output(outputs[t], "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    sums: dict[str, np.ndarray] = {}
    batches = 0
    for feed in tqdm(data.batches(), total=data.num_batches(), desc="input second moments", unit="batch",
                     disable=not progress, leave=False):
        batches += 1
        # ORT may read the bound inputs in place: keep them alive until the run is over.
        inputs = {name: np.ascontiguousarray(value) for name, value in feed.items()}
        try:
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            session.run_with_iobinding(binding)
        except Exception as e:  # ORT raises its own exception types
            raise SmoothQuantError(f"{model.path}: ONNX Runtime failed while measuring input second moments: "
                                   f"{e}") from None
        for tensor, product in products.items():
            if tensor in sums:
                sums[tensor] += product  # non-finite sums stay so: the caller reports and skips them
            else:
                sums[tensor] = product.copy()
    if batches == 0:
        raise SmoothQuantError(f"{data.description}: no calibration batches left to measure input second "
                               f"moments (an iterator can be read only once)")
    return sums


GRAM_BUDGET_BYTES = 512 << 20


class WeightHessians(Mapping):
    """``H[w] = Σ xᵀx`` per weight initializer ``w``, summed over the inputs of the ops reading it,
    measured on first request a chunk at a time.

    ``inputs`` maps each weight to its ops' ``(activation, channels)`` pairs, in the order the
    caller will ask (graph order). A request for a weight not yet measured runs one pass over
    ``data`` for it and the weights after it, as many as fit in ``budget`` bytes of float32 sums,
    and drops the chunk before; so a caller asking in order makes ``ceil(total / budget)`` passes
    (one when everything fits). The graph is snapshotted at construction: later edits to
    ``proto`` (the quantizers add initializers while asking) do not reach the measurement.
    ``H[w]`` is None where an input held inf or NaN (listed in :attr:`non_finite`).
    """

    def __init__(self, model: LoadedModel, proto: onnx.ModelProto, inputs: Mapping[str, Sequence[tuple[str, int]]],
                 data: CalibrationData, *, budget: int = GRAM_BUDGET_BYTES, progress: bool = True):
        self._model, self._data, self._budget, self._progress = model, data, budget, progress
        self._inputs = {w: tuple(dict.fromkeys(pairs)) for w, pairs in inputs.items()}
        self._proto, self._big = split_large_inline(proto)
        self._ready: dict[str, np.ndarray | None] = {}
        self.passes = 0
        self.non_finite: list[str] = []

    def __getitem__(self, weight: str) -> np.ndarray | None:
        if weight not in self._inputs:
            raise KeyError(weight)
        if weight not in self._ready:
            self._measure_from(weight)
        return self._ready[weight]

    def __iter__(self) -> Iterator[str]:
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def _measure_from(self, first: str) -> None:
        order = list(self._inputs)
        chunk, channels, size = [], {}, 0
        for weight in order[order.index(first):]:
            new = {t: c for t, c in self._inputs[weight] if t not in channels}
            cost = sum(4 * c * c for c in new.values())
            if chunk and size + cost > self._budget:
                break
            chunk.append(weight)
            channels.update(new)
            size += cost
        grams = collect_grams(self._model, self._proto, channels, self._data, progress=self._progress,
                              initializers=self._big)
        self.passes += 1
        self._ready = {}
        for weight in chunk:
            pairs = self._inputs[weight]
            total = grams[pairs[0][0]] if len(pairs) == 1 else sum(grams[t] for t, _ in pairs)
            if np.all(np.isfinite(total)):
                self._ready[weight] = total
            else:
                self._ready[weight] = None
                self.non_finite.append(weight)


class SmoothedHessians(Mapping):
    """GPTQ's ``H[w]`` from second moments measured on the FP model, under the smoothing.

    Smoothing is exact in FP: an op whose FP input is X reads ``X / s`` once smoothed, so::

        Σ_x (x / s)ᵀ (x / s) = diag(1/s) G diag(1/s),     G = Σ_x xᵀx of the FP input

    and the calibration pass, which runs the FP model anyway, measures ``G`` beside the ranges:
    no second pass. ``inputs`` maps each weight to ``(FP activation, s or None)`` per op reading
    it (``H[w]`` sums them); ``grams``: G per activation. Weights not in ``inputs`` (their G did
    not fit the calibration pass's budget) come from ``rest``, measured on the smoothed graph.
    """

    def __init__(self, inputs: Mapping[str, Sequence[tuple[str, np.ndarray | None]]], grams: Mapping[str, np.ndarray],
                 rest: WeightHessians | None = None):
        self._inputs, self._grams, self._rest = dict(inputs), grams, rest
        self.non_finite: list[str] = []

    @property
    def passes(self) -> int:
        """Passes over the data beyond the calibration pass."""
        return self._rest.passes if self._rest is not None else 0

    def __getitem__(self, weight: str) -> np.ndarray | None:
        if weight not in self._inputs:
            if self._rest is None:
                raise KeyError(weight)
            h = self._rest[weight]
            if h is None and weight not in self.non_finite:
                self.non_finite.append(weight)
            return h
        total = None
        for activation, scales in self._inputs[weight]:
            g = self._grams[activation]
            if scales is not None:
                inv = 1.0 / np.asarray(scales, dtype=np.float32).reshape(-1)
                g = g * inv[:, None] * inv[None, :]
            total = g.copy() if total is None else total + g
        if not np.all(np.isfinite(total)):
            if weight not in self.non_finite:
                self.non_finite.append(weight)
            return None
        return total

    def __iter__(self) -> Iterator[str]:
        yield from self._inputs
        if self._rest is not None:
            yield from (w for w in self._rest if w not in self._inputs)

    def __len__(self) -> int:
        return len(self._inputs) + (sum(w not in self._inputs for w in self._rest) if self._rest is not None else 0)
