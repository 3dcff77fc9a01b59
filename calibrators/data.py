"""Calibration data: ``.npz`` files, a directory of them, or any iterable of feed dicts.

An ``.npz`` holds one array per model input, named like the input, samples on axis 0.
Everything is checked against the model's inputs before any inference runs: a missing or
unknown name, a wrong rank, dtype or fixed dimension is an error naming the input.
Arrays are read one file at a time and fed in batches, so memory does not grow with
the number of files.
"""

from __future__ import annotations

import copy
import itertools
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from passes.ir.errors import SmoothQuantError

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None: a symbolic or unknown dimension


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


def _check_array(where: str, spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...], batched: bool) -> None:
    if dtype != spec.dtype:
        raise SmoothQuantError(f"{where}: input {spec.name!r} has dtype {dtype}, the model expects {spec.dtype}")
    if len(shape) != len(spec.shape):
        raise SmoothQuantError(
            f"{where}: input {spec.name!r} has rank {len(shape)} (shape {shape}), the model expects rank "
            f"{len(spec.shape)} (shape {tuple('?' if d is None else d for d in spec.shape)})"
        )
    for axis, (have, want) in enumerate(zip(shape, spec.shape)):
        if want is None or (batched and axis == 0):
            continue
        if have != want:
            raise SmoothQuantError(
                f"{where}: input {spec.name!r} has size {have} on axis {axis}, the model expects {want}"
            )


def _check_names(where: str, specs: list[InputSpec], names: Iterable[str]) -> None:
    names = set(names)
    for spec in specs:
        if spec.name not in names:
            raise SmoothQuantError(f"{where}: no array for model input {spec.name!r} (has: {sorted(names)})")
    unknown = sorted(names - {s.name for s in specs})
    if unknown:
        raise SmoothQuantError(f"{where}: array {unknown[0]!r} matches no model input "
                               f"(inputs: {[s.name for s in specs]})")


def _npz_headers(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Dtype and shape of each array of an .npz, read from the headers only."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if not member.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    header_end = f.tell()
                claimed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                stored = z.getinfo(member).file_size - header_end
                if dtype.hasobject or claimed > stored:
                    raise SmoothQuantError(f"{path}: array {member[:-4]!r} claims shape {tuple(shape)} ({claimed} bytes) "
                                           f"but holds {stored} bytes" + (" (object arrays are refused)"
                                                                          if dtype.hasobject else ""))
                headers[member[:-4]] = (np.dtype(dtype), tuple(shape))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SmoothQuantError(f"{path}: not a readable .npz file ({e})") from None
    return headers


class CalibrationData:
    """Batches of feeds for the calibrator; validate with :meth:`check` before use."""

    def __init__(self, source: str | Path | Iterable[Feed], batch_size: int = 8):
        if batch_size < 1:
            raise SmoothQuantError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(source, Mapping):
            raise SmoothQuantError("calibration data is one feed dict: pass a list of them (calib=[feed]), "
                                   "an .npz or a folder of them")
        self.batch_size = batch_size
        self._files: list[Path] | None = None
        self._iterable: Iterable[Feed] | None = None
        self._peeked: Feed | None = None
        self._limit: int | None = None  # samples per pass (head)
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                self._files = sorted(path.glob("*.npz"))
                if not self._files:
                    raise SmoothQuantError(f"{path}: calibration directory holds no .npz files")
            elif path.is_file():
                self._files = [path]
            else:
                raise SmoothQuantError(f"{path}: calibration data not found")
            self.description = str(path)
        else:
            iterator = iter(source)
            try:
                self._peeked = next(iterator)
            except StopIteration:
                raise SmoothQuantError("calibration data: the iterable yielded no feeds") from None
            self._iterable = itertools.chain([self._peeked], iterator)
            # A list (or any re-iterable) is read afresh on each pass; an iterator only once.
            self._source = None if iter(source) is source else source
            self.description = "calibration feeds"

    def check(self, specs: list[InputSpec]) -> None:
        """Raise a :class:`SmoothQuantError` naming the input if the data cannot feed the model."""
        if self._files is None:
            feed = self._peeked
            if not isinstance(feed, Mapping):
                raise SmoothQuantError(f"calibration feeds must be dicts of input name to array, got {type(feed).__name__}")
            _check_names(self.description, specs, feed)
            by_name = {s.name: s for s in specs}
            for name, value in feed.items():
                value = np.asarray(value)
                _check_array(self.description, by_name[name], value.dtype, value.shape, batched=True)
            return
        fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
        fixed_batch = len(fixed) == 1
        if fixed_batch:  # a model exported with a fixed batch size takes only that
            self.batch_size = fixed.pop()
        total = 0
        for path in self._files:
            headers = _npz_headers(path)
            _check_names(str(path), specs, headers)
            counts = {name: shape[0] if shape else 0 for name, (_, shape) in headers.items()}
            if len(set(counts.values())) > 1:
                raise SmoothQuantError(f"{path}: arrays disagree on the number of samples (axis 0): {counts}")
            for spec in specs:
                dtype, shape = headers[spec.name]
                _check_array(str(path), spec, dtype, shape, batched=True)
            if specs and all(0 in headers[spec.name][1][1:] for spec in specs):
                raise SmoothQuantError(f"{path}: every input has a zero-length dimension "
                                       f"({ {spec.name: headers[spec.name][1] for spec in specs} }): "
                                       f"zero-length samples calibrate nothing")
            n = next(iter(counts.values()), 0)
            if self.batch_size and fixed_batch and n % self.batch_size:
                raise SmoothQuantError(f"{path}: {n} samples, but the model takes batches of exactly "
                                       f"{self.batch_size} (its inputs' first dimension): give a multiple of it")
            total += n
        if total == 0:
            raise SmoothQuantError(f"{self.description}: calibration set is empty (0 samples)")

    def head(self, samples: int) -> CalibrationData:
        """The same data, each pass stopping after its first ``samples`` samples (a re-readable source)."""
        if samples < 1:
            raise SmoothQuantError(f"a calibration subset needs at least 1 sample, got {samples}")
        out = copy.copy(self)
        if self._iterable is not None and self._source is not None:
            out._iterable = iter(self._source)  # its own pass: the original's is left unread
        out._limit = samples if self._limit is None else min(samples, self._limit)
        return out

    def num_batches(self) -> int | None:
        """Batches per pass (the progress bars' total); None for an iterator of unknown length."""
        full = self._num_batches()
        if self._limit is None or full is None:
            return full
        rows = self.batch_size if self._files is not None else max(1, len(next(iter(self._peeked.values()), ())))
        return min(full, -(-self._limit // rows))

    def _num_batches(self) -> int | None:
        if self._files is None:
            return len(self._source) if hasattr(self._source, "__len__") else None
        total = 0
        for path in self._files:
            shape = next(iter(_npz_headers(path).values()))[1]
            total += -(-shape[0] // self.batch_size)
        return total

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        if self._limit is None:
            yield from self._all_batches()
            return
        left = self._limit
        for feed in self._all_batches():
            rows = len(next(iter(feed.values()))) if feed else 0
            yield feed if rows <= left else {k: v[:left] for k, v in feed.items()}
            left -= rows
            if left <= 0:
                return

    def _all_batches(self) -> Iterator[dict[str, np.ndarray]]:
        if self._iterable is not None:
            feeds, self._iterable = self._iterable, (iter(self._source) if self._source is not None else iter(()))
            for i, feed in enumerate(feeds):
                yield _finite({k: np.asarray(v) for k, v in feed.items()}, f"calibration feed {i}")
            return
        for path in self._files:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            n = next(iter(arrays.values())).shape[0]
            for start in range(0, n, self.batch_size):
                yield _finite({k: v[start:start + self.batch_size] for k, v in arrays.items()}, str(path), start)
            del arrays


def _finite(feed: dict[str, np.ndarray], where: str, first_row: int = 0) -> dict[str, np.ndarray]:
    """``feed``, or an error naming the input and sample that hold NaN or Inf (a NaN's effect on the
    calibrated ranges would depend on where it sits: ReduceMax propagates it from some positions only)."""
    for name, value in feed.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value.reshape(len(value), -1)))[0][0] if value.ndim else 0
            raise SmoothQuantError(f"{where}: input {name!r} holds NaN or Inf (sample {first_row + int(bad)}); "
                                   f"the data must be finite")
    return feed
