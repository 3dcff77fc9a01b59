"""A stand-in for TensorRT's compiled core, so that TensorRT's real pure-Python layers run without libnvinfer.

The ``tensorrt-cu12-bindings`` wheel holds two kinds of code: ``tensorrt_bindings/tensorrt.so`` (the
pybind11 module over libnvinfer, which cannot load without NVIDIA's libraries) and pure Python: the
package ``__init__.py`` (``nptype``, ``volume``, the type aliases' ``itemsize``) and the
``tensorrt.plugin`` package (``register``, ``impl``, ``aot_impl``, ``autotune``, their validators,
the plugin creator and the plugin classes TensorRT calls back). :mod:`tests.trt_harness` unpacks the
pure Python from the wheel and puts this module where ``tensorrt.so`` would be (as
``tensorrt/tensorrt.py``), so ``import tensorrt.plugin`` runs NVIDIA's code unchanged.

Only what that code touches is here, and each piece behaves as TensorRT's sources say (NVIDIA/TensorRT,
``python/src/infer/pyPlugin.cpp``, ``pyCore.cpp`` and ``include/NvInferRuntime*.h``, release 11.1):

- ``PluginField(name, data, type)`` keeps a pointer to ``data``'s buffer and its element count
  (``plugin_field_constructor``: ``length = info.size``); reading ``.data`` reinterprets those bytes as
  the field's type (``kINT32`` int32, ``kINT8``/``kUNKNOWN`` int8, ``kINT16``, ``kFLOAT32``,
  ``kFLOAT64``, ``kINT64``, ``kCHAR`` as int8 chars), and raises ``AttributeError`` for FP16/BF16/FP8/
  INT4/FP4/DIMS ("No known conversion for returning data from PluginField").
- ``DataType``/``TensorFormat``/``PluginFieldType`` carry TensorRT's enum names and values
  (``NvInferRuntimeBase.h``, ``NvInferRuntime.h``); the lower-case aliases are the core's
  (``trt.float32`` is ``DataType.FLOAT``, ...).
- ``IExprBuilder.constant``/``operation`` build ``IDimensionExpr``s that fold when both operands are
  build-time constants (``IExprBuilder`` docs); non-constant dimensions are named symbols, and
  :meth:`IDimensionExpr.evaluate` (stand-in only) gives their value for chosen sizes, so tests can
  check what TensorRT would compute at run time.
- The plugin registry finds a creator by ``(name, version, namespace)``
  (``IPluginRegistry::getCreator``); registering the same triple twice fails, as TensorRT's does.
- Features that appeared in TensorRT 10.9 (AOT plugins: ``QuickPluginCreationRequest``,
  ``IPluginV3QuickAOTBuild``, ``ISymExpr``, ``PluginArgType``, ``PluginArgDataType``, the
  ``PREFER_*_PYTHON_PLUGINS`` network flags) exist only when the emulated version is 10.9 or newer:
  ``tensorrt.plugin`` itself tests ``hasattr(trt, "QuickPluginCreationRequest")``.

The emulated version comes from ``$TRT_STANDIN_VERSION`` (the harness sets it to the wheel's version).
Nothing here builds, times or runs anything: the driver in :mod:`tests.trt_driver` plays TensorRT's
part (the ONNX parser's plugin import, the builder's call sequence) and says where it follows which source.
"""

from __future__ import annotations

import enum
import os

import numpy as np

VERSION = tuple(int(p) for p in os.environ.get("TRT_STANDIN_VERSION", "11.4.0").split(".")[:2])
AOT = VERSION >= (10, 9)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


_FIELD_DTYPES = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                 PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8}


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_FOLD = {DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
         DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
         DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
         DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4


class Logger(ILogger):
    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity
        self.messages: list[tuple[ILogger.Severity, str]] = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))


# Names the wheel's __init__.py decorates (context managers); nothing here builds or runs an engine.
class ICudaEngine: ...
class IExecutionContext: ...
class Runtime: ...
class IHostMemory: ...
class Builder: ...
class INetworkDefinition: ...
class OnnxParser: ...
class IBuilderConfig: ...
class ITensor: ...


class _Items:
    """A fixed-length sequence (``Dims``, ``DimsExprs``)."""

    _d: list

    def __len__(self):
        return len(self._d)

    def __iter__(self):
        return iter(self._d)

    def __getitem__(self, i):
        return self._d[i]


class Dims(_Items):
    MAX_DIMS = 8

    def __init__(self, shape=()):
        self._d = [0] * shape if isinstance(shape, int) else [int(d) for d in shape]

    def __setitem__(self, i, v):
        self._d[i] = int(v)

    def __eq__(self, other):
        return list(self) == list(other)

    def __repr__(self):
        return f"Dims({tuple(self._d)})"


class IDimensionExpr:
    """A constant, a named run-time size, or an operation on two expressions."""

    def __init__(self, value=None, symbol=None, op=None, args=()):
        self._value, self._symbol, self._op, self._args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self._value is not None

    def get_constant_value(self) -> int:
        if self._value is None:
            raise RuntimeError("get_constant_value() of a non-constant IDimensionExpr")
        return self._value

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, sizes: dict[str, int]) -> int:
        """Stand-in only: the value at run time, given each symbol's size."""
        if self._value is not None:
            return self._value
        if self._symbol is not None:
            return sizes[self._symbol]
        return _FOLD[self._op](*(a.evaluate(sizes) for a in self._args))

    def __repr__(self):
        if self._value is not None:
            return str(self._value)
        return self._symbol or f"{self._op.name}({', '.join(map(repr, self._args))})"


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value=int(value))

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if not isinstance(first, IDimensionExpr) or not isinstance(second, IDimensionExpr):
            raise TypeError(f"operation({op}): operands must be IDimensionExpr, got {type(first)}, {type(second)}")
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(value=_FOLD[op](first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, output_index, opt, upper):
        raise NotImplementedError("size tensors are not used by the smoothquant plugins")


class DimsExprs(_Items):
    def __init__(self, n: int = 0):
        self._d = [None] * n

    def __setitem__(self, i, expr):
        if not isinstance(expr, IDimensionExpr):
            raise TypeError(f"DimsExprs[{i}] must be an IDimensionExpr, got {type(expr)}")
        self._d[i] = expr


class PluginTensorDesc:
    def __init__(self):
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0


class DynamicPluginTensorDesc:
    def __init__(self):
        self.desc, self.min, self.opt, self.max = PluginTensorDesc(), Dims(), Dims(), Dims()


class PluginField:
    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):  # noqa: A002
        self.name, self.type = name, type
        if data is None:
            self._bytes, self.size = b"", 0
        else:
            view = memoryview(data)
            self._bytes, self.size = view.tobytes(), view.nbytes // view.itemsize

    @property
    def data(self):
        if self.type not in _FIELD_DTYPES:
            raise AttributeError("No known conversion for returning data from PluginField")
        dtype = np.dtype(_FIELD_DTYPES[self.type])
        if len(self._bytes) < self.size * dtype.itemsize:
            raise ValueError(f"PluginField {self.name!r}: {self.size} x {dtype} would read past its "
                             f"{len(self._bytes)}-byte buffer (TensorRT would read out of bounds)")
        return np.frombuffer(self._bytes, dtype=dtype, count=self.size).copy()


class PluginFieldCollection(list):
    pass


class IPluginCreatorInterface: ...


class IPluginCreatorV3Quick(IPluginCreatorInterface):
    def __init__(self):
        pass


class IPluginV3:
    def __init__(self):
        pass


class IPluginV3QuickCore:
    def __init__(self):
        pass


class IPluginV3QuickBuild:
    def __init__(self):
        pass


class IPluginV3QuickRuntime:
    def __init__(self):
        pass


class _Registry:
    def __init__(self):
        self._creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, plugin_namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self._creators:
            raise RuntimeError(f"a plugin creator {key} is already registered")
        self._creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, plugin_namespace: str = ""):
        return self._creators.get((name, version, plugin_namespace))

    @property
    def all_creators(self):
        return list(self._creators.values())


_REGISTRY = _Registry()


def get_plugin_registry():
    return _REGISTRY


class NetworkDefinitionCreationFlag(enum.Enum):
    STRONGLY_TYPED = 1 if VERSION < (11, 0) else 0  # 11.x: deprecated, always on


if AOT:
    class QuickPluginCreationRequest(enum.Enum):
        UNKNOWN = 0
        PREFER_JIT = 1
        PREFER_AOT = 2
        STRICT_JIT = 3
        STRICT_AOT = 4

    class IPluginV3QuickAOTBuild:
        def __init__(self):
            pass

    class PluginArgType(enum.Enum):
        INT = 0

    class PluginArgDataType(enum.Enum):
        INT8 = 0
        INT16 = 1
        INT32 = 2

    class ISymExpr:
        def __init__(self):
            pass

    class NetworkDefinitionCreationFlag(enum.Enum):  # noqa: F811 - 10.9 added the plugin preferences
        STRONGLY_TYPED = 1 if VERSION < (11, 0) else 0
        PREFER_JIT_PYTHON_PLUGINS = 2 if VERSION < (11, 0) else 1
        PREFER_AOT_PYTHON_PLUGINS = 3 if VERSION < (11, 0) else 2


class KernelLaunchParamsSetter:
    """What ``getLaunchParams`` hands Python as ``launchParams`` (``IKernelLaunchParams``): the plugin layer
    assigns ``ISymExpr``s to its seven fields."""

    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = None
        self.shared_mem = None


class SymExprsSetter:
    """``ISymExprs``: ``nbSymExprs`` is set first, then each entry."""

    def __init__(self):
        self.nbSymExprs = 0
        self._items: dict[int, object] = {}

    def __setitem__(self, i, expr):
        if not 0 <= i < self.nbSymExprs:
            raise IndexError(f"ISymExprs index {i} outside nbSymExprs={self.nbSymExprs}")
        self._items[i] = expr

    def __getitem__(self, i):
        return self._items[i]


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64, uint8, int4 = DataType.INT8, DataType.INT32, DataType.INT64, DataType.UINT8, DataType.INT4
fp8, fp4 = DataType.FP8, DataType.FP4
bool = DataType.BOOL  # noqa: A001 - the core's own alias, as in TensorRT
