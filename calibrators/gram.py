"""Input second moments of linear ops, ``H = Σ_x xᵀx``, per weight, for GPTQ (:mod:`passes.gptq`).

They are measured inside the graph by ONNX Runtime (:func:`calibrators.calibrate.add_gram_nodes`):
one ``[C, C]`` matrix per activation and batch leaves the session, never the activation itself.
Memory: ``4 C²`` bytes per activation for the sums and about as much again for one batch's
outputs; :class:`WeightHessians` keeps that under a budget by measuring a chunk of activations
per pass, and :class:`SmoothedHessians` serves those the calibration pass measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from calibrators.calibrate import collect_grams
from calibrators.data import CalibrationData
from calibrators.minmax import split_large_inline
from passes.ir.onnx_io import LoadedModel

__all__ = ["GRAM_BUDGET_BYTES", "SmoothedHessians", "WeightHessians", "collect_grams"]


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
