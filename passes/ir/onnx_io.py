"""Loading and saving ONNX models without loading what is not needed.

* :func:`load_model` parses the graph only (``load_external_data=False``) and checks that
  every external-data file a tensor points at exists and is long enough, so a model of
  many gigabytes costs only its graph in memory until a pass asks for one tensor. Large
  tensors stored inline in the .onnx file are not parsed either: they become external
  references to their own bytes inside that file (offset and length), read on demand, so
  an inline model costs no more than an external-data one.
* :class:`TensorStore` gives passes the tensors they ask for, one at a time.
* :func:`save_model` writes a model atomically: into a temporary folder beside the target,
  streaming each tensor (copied from the source's external data when untouched), validated
  there, then moved into place (:mod:`passes.ir.atomic`). On any failure nothing is left behind.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from passes.ir.atomic import atomic_write
from passes.ir.errors import SmoothQuantError

PROTOBUF_LIMIT = 2**31 - 1
# Write external data when tensors add up to more than this (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Tensors smaller than this stay inline even in an external-data model (as onnx does).
INLINE_TENSOR_BYTES = 1024


# Inline tensors at least this large stay in the file until asked for (see load_model).
LAZY_INLINE_BYTES = 1 << 16


@dataclass
class LoadedModel:
    """A model proto whose external tensors are still on disk, and where they are.

    ``lazy_inline``: tensors stored inline in the .onnx file that the proto points at there
    (as external data of the model file itself); a saved copy keeps them inline.
    """

    proto: onnx.ModelProto
    path: Path
    lazy_inline: frozenset[str] = frozenset()

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Parse ``path`` without external data, and check that it is a usable ONNX model."""
    path = Path(path)
    if not path.exists():
        raise SmoothQuantError(f"{path}: no such file")
    if not path.is_file():
        raise SmoothQuantError(f"{path}: not a regular file")
    try:
        parsed = _parse_lazily(path)
        if parsed is None:
            with path.open("rb") as f:
                parsed = onnx.load_model(f, load_external_data=False), frozenset()
    except (DecodeError, ValueError, RuntimeError) as e:
        raise SmoothQuantError(f"{path}: not a valid ONNX model ({type(e).__name__}: {e})") from None
    proto, lazy = parsed
    if not proto.graph.node:
        raise SmoothQuantError(f"{path}: not a valid ONNX model (the graph has no nodes; is the file truncated?)")
    try:
        try:
            onnx.checker.check_model(str(path))  # by path: external data is checked in place, not loaded
        except onnx.checker.ValidationError as e:
            if "symbolic link" not in str(e) and "not regular file" not in str(e):
                raise
            onnx.checker.check_model(_without_external_data(proto))  # linked files (a Hugging Face cache): the graph
            # here, the data files by check_external_data below
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise SmoothQuantError(f"{path}: ONNX checker rejected the model: {first}") from None
    except UnicodeDecodeError as e:  # the checker decodes its messages; a corrupt name is not UTF-8
        raise SmoothQuantError(f"{path}: not a valid ONNX model (a name or string is not UTF-8: {e.reason} "
                               f"at byte {e.start})") from None
    check_external_data(proto, path.parent, path)
    return LoadedModel(proto, path, lazy)


IN_MEMORY = "<in-memory model>"


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> LoadedModel:
    """A model given as a proto (an export pipeline's), checked like a file; its external data is read
    from ``base_dir`` (default: the current folder). The pipeline works on a copy: ``proto`` is never
    modified."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    label = base / IN_MEMORY
    if not proto.graph.node:
        raise SmoothQuantError(f"{label}: the graph has no nodes")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        onnx.checker.check_model(_without_external_data(copy))
    except (onnx.checker.ValidationError, UnicodeDecodeError, ValueError) as e:
        raise SmoothQuantError(f"{label}: ONNX checker rejected the model: {str(e).strip().splitlines()[0]}") from None
    check_external_data(copy, base, label)
    return LoadedModel(copy, label)


def inline_external_data(proto: onnx.ModelProto, base_dir: Path) -> bool:
    """Read every external tensor of ``proto`` into it (so it stands alone); False, untouched, if that
    would pass protobuf's 2 GiB."""
    if _total_tensor_bytes(proto) + proto.ByteSize() >= PROTOBUF_LIMIT:
        return False
    for t in proto.graph.initializer:
        if uses_external_data(t):
            make_inline(t, base_dir)
    return True


def _without_external_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external tensors are empty placeholders of their type (for checking the graph alone)."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for t in light.graph.initializer:
        if uses_external_data(t):
            del t.external_data[:]
            del t.dims[:]
            t.dims.append(0)
            t.data_location = onnx.TensorProto.DEFAULT
    return light


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, payload start, field end) of each protobuf field in
    ``buf[start:end]``; the payload of a length-delimited field is ``[payload start, end)``."""
    pos = start
    while pos < end:
        key, payload = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, payload)
        elif wire == 1:
            stop = payload + 8
        elif wire == 2:
            length, payload = _varint(buf, payload)
            stop = payload + length
        elif wire == 5:
            stop = payload + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if stop > end:
            raise ValueError("truncated protobuf field")
        yield number, pos, payload, stop
        pos = stop


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto


def _parse_lazily(path: Path) -> tuple[onnx.ModelProto, frozenset[str]] | None:
    """The model with each large inline ``raw_data`` left in the file and referenced as external
    data of the file itself (location, offset, length); None when nothing is that large or the
    layout is unusual (the caller then parses the file the usual way)."""
    size = path.stat().st_size
    if size < LAZY_INLINE_BYTES:
        return None
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _split_fields(buf, size, path.name)
        finally:
            buf.release()


def _split_fields(buf: memoryview, size: int, location: str) -> tuple[onnx.ModelProto, frozenset[str]] | None:
    top, graphs = bytearray(), []
    for number, start, payload, stop in _fields(buf, 0, size):
        if number == _MODEL_GRAPH:
            graphs.append((payload, stop))
        else:
            top += buf[start:stop]
    if len(graphs) != 1:
        return None
    rest, tensors = bytearray(), []
    for number, start, payload, stop in _fields(buf, *graphs[0]):
        if number == _GRAPH_INITIALIZER:
            tensors.append((start, payload, stop))
        else:
            rest += buf[start:stop]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(top))
    model.graph.ParseFromString(bytes(rest))
    lazy = set()
    for _, payload, stop in tensors:
        fields, raw = bytearray(), None
        for number, start, data, end in _fields(buf, payload, stop):
            if number == _TENSOR_RAW_DATA and end - data >= LAZY_INLINE_BYTES:
                raw = (data, end)
            else:
                fields += buf[start:end]
        tensor = model.graph.initializer.add()
        if raw is None:
            tensor.ParseFromString(bytes(buf[payload:stop]))
            continue
        tensor.ParseFromString(bytes(fields))
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            return None  # raw data and an external location at once: let onnx decide
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        lazy.add(tensor.name)
    return (model, frozenset(lazy)) if lazy else None


_EXTERNAL_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def check_external_data(proto: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Every external tensor's fields are well formed (known keys; offset and length whole numbers >= 0;
    the length, when given, the tensor's byte size) and its bytes lie inside an existing file."""
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        where = f"{path}: tensor {tensor.name!r}"
        unknown = sorted({e.key for e in tensor.external_data} - _EXTERNAL_KEYS)
        if unknown:
            raise SmoothQuantError(f"{where} has unknown external-data fields {unknown}")
        for entry in tensor.external_data:
            if entry.key in ("offset", "length") and not entry.value.isdigit():
                raise SmoothQuantError(f"{where}: external-data {entry.key} {entry.value!r} is not a whole number >= 0")
        info = ExternalDataInfo(tensor)
        if not info.location:
            raise SmoothQuantError(f"{where} is stored externally but names no location")
        location = base_dir / info.location
        if not location.is_file():
            raise SmoothQuantError(f"{where} points at external data {info.location!r}, which does not exist")
        size = tensor_nbytes(tensor)
        if info.length is not None and size is not None and info.length != size:
            raise SmoothQuantError(f"{where}: external-data length {info.length} is not its size, {size} bytes "
                                   f"({onnx.TensorProto.DataType.Name(tensor.data_type)} {list(tensor.dims)})")
        need = (info.offset or 0) + (info.length if info.length is not None else (size or 0))
        have = location.stat().st_size
        if need > have:
            raise SmoothQuantError(f"{where} needs bytes up to {need} of {info.location!r}, which has only {have} "
                                   f"(truncated?)")


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The byte size of the tensor's data (4-bit types packed two to a byte); None for strings."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


class TensorStore:
    """Reads initializers on demand, from the proto or from their external data file."""

    def __init__(self, model: LoadedModel):
        self._base_dir = model.base_dir
        self._outer: dict[str, onnx.TensorProto] = {}
        self._by_name = {t.name: t for t in model.proto.graph.initializer}

    def scoped(self, graph: onnx.GraphProto) -> TensorStore:
        """A store for a subgraph: its own initializers, and those of every enclosing scope."""
        inner = TensorStore.__new__(TensorStore)
        inner._base_dir, inner._outer = self._base_dir, dict(self._by_name)
        inner.refresh(graph)
        return inner

    def refresh(self, graph: onnx.GraphProto) -> None:
        self._by_name = {**self._outer, **{t.name: t for t in graph.initializer}}

    def track(self, tensor: onnx.TensorProto) -> None:
        """Index one tensor just added to the graph (cheaper than :meth:`refresh`)."""
        self._by_name[tensor.name] = tensor

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def proto(self, name: str) -> onnx.TensorProto:
        return self._by_name[name]

    def array(self, name: str) -> np.ndarray:
        return read_array(self._by_name[name], self._base_dir)


def read_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A tensor's value, its external data read by this module (through symlinks: a Hugging Face cache
    links every file into ``blobs/``, which onnx's own reader refuses)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)  # a stub: the bytes are on disk
    make_inline(inline, base_dir)
    return numpy_helper.to_array(inline)


def make_inline(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Read an external tensor's bytes (through symlinks) into ``tensor`` itself."""
    raw = tensor_bytes(tensor, base_dir)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def tensor_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The raw little-endian bytes of one tensor, read from disk if external."""
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with (base_dir / info.location).open("rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length if info.length is not None else (tensor_nbytes(tensor) or -1))
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _total_tensor_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for t in proto.graph.initializer:
        total += (tensor_nbytes(t) or 0) if uses_external_data(t) or not t.HasField("raw_data") else len(t.raw_data)
    return total


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, source_dir: Path | None, *,
               external_data: bool | None = None, inline_in_source: frozenset[str] = frozenset(),
               validate: Callable[[Path], None] | None = None) -> list[Path]:
    """Write ``proto`` to ``path`` atomically (:func:`passes.ir.atomic.atomic_write`); return the files written.

    ``validate(path)`` runs on the written model where it lies, its external data beside it, before
    anything is moved into place; an exception there leaves the old output as it was.

    Tensors still pointing at the source's external data are streamed from ``source_dir``,
    one at a time. With ``external_data=None`` the model gets an external-data file
    (``<name>.data``) when it must (tensors over 1 GiB in all, or the source used one;
    ``inline_in_source``: tensors that were inline in the source, see :class:`LoadedModel`).
    ``proto`` is not modified.
    """
    path = Path(path)
    if external_data is None:
        had_external = any(uses_external_data(t) and t.name not in inline_in_source for t in proto.graph.initializer)
        external_data = had_external or _total_tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    if any(uses_external_data(t) for t in proto.graph.initializer) and source_dir is None:
        raise ValueError("the model points at external data but no source directory was given")

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.initializer[:]
    if not external_data:
        for t in proto.graph.initializer:
            new = out.graph.initializer.add()
            new.CopyFrom(t)
            if uses_external_data(t):
                del new.external_data[:]
                new.data_location = onnx.TensorProto.DEFAULT
                new.raw_data = tensor_bytes(t, source_dir)
        if out.ByteSize() > PROTOBUF_LIMIT:
            raise SmoothQuantError(f"{path}: model exceeds 2 GiB; it must be written with external data")
        with atomic_write(path, validate=_model_check(validate)) as (tmp_model,):
            tmp_model.write_bytes(out.SerializeToString())
        return [path]

    data_path = path.with_name(path.name + ".data")
    with atomic_write(data_path, path, validate=_model_check(validate)) as (tmp_data, tmp_model):
        offset = 0
        with tmp_data.open("wb") as data:
            for t in proto.graph.initializer:
                new = out.graph.initializer.add()
                new.CopyFrom(t)
                raw = tensor_bytes(t, source_dir or Path("."))
                if len(raw) < INLINE_TENSOR_BYTES:
                    del new.external_data[:]
                    new.data_location = onnx.TensorProto.DEFAULT
                    _set_raw(new, raw)
                    continue
                pad = (-offset) % 4096  # page-aligned, so runtimes can memory-map tensors
                data.write(b"\0" * pad)
                offset += pad
                data.write(raw)
                _set_raw(new, None)
                del new.external_data[:]
                new.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = new.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
        tmp_model.write_bytes(out.SerializeToString())
    return [path, data_path]


def _model_check(validate: Callable[[Path], None] | None) -> Callable[[list[Path]], None] | None:
    return None if validate is None else (lambda temps: validate(temps[-1]))


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _set_raw(tensor: onnx.TensorProto, raw: bytes | None) -> None:
    for field in _TYPED_FIELDS:
        tensor.ClearField(field)
    tensor.ClearField("raw_data")
    if raw is not None:
        tensor.raw_data = raw
