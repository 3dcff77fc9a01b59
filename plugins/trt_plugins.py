"""TensorRT plugins for the ``com.smoothquant`` ops, on TensorRT's Python plugin layer (``tensorrt.plugin``).

Importing this module registers ``smoothquant::QuantizePerToken`` and ``smoothquant::W8A8Linear``
with TensorRT's plugin registry; TensorRT's ONNX parser then maps the custom nodes written by
``--granularity per-token --target tensorrt`` onto them (their ``plugin_namespace`` attribute).
``python -m passes.build_engine MODEL.onnx`` imports it for such models. Schema: :mod:`plugins.schema`.

Two implementations of each op; the engine builder picks one (``--plugin-impl``):

- AOT (default, TensorRT >= 10.9): ``aot_impl`` returns PTX compiled from the Triton kernels
  (:mod:`plugins.aot`) with its launch parameters; TensorRT embeds it in the engine, which then runs
  without Python. ``W8A8Linear`` offers the tiles of :data:`plugins.tiles.LINEAR_TACTICS` as custom
  tactics, so TensorRT's autotuner picks the fastest per layer.
- JIT (TensorRT >= 10.8): ``impl`` calls the Triton kernels on TensorRT's stream, writing straight into
  TensorRT's output buffers (:mod:`plugins.trt_jit`).

Torch and Triton are imported only when a kernel is compiled or run, so registration needs neither.

How TensorRT calls these functions decides how they are written (checked by
``tests/test_trt_plugins.py``, which runs this module under the real ``tensorrt.plugin`` package of
TensorRT 10.8, 10.9, 10.16 and 11.4):

- No ``from __future__ import annotations``: ``tensorrt.plugin``'s validators read the annotations
  with ``inspect.signature`` and compare them with classes; strings fail every one of them.
- ``aot_impl`` and ``autotune`` must annotate their returns as the validators demand
  (``tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]``, ``list[AutoTuneCombination]``).
- ``autotune`` must name the I/O types: an ``AutoTuneCombination`` with tactics only yields no
  type/format combination, and TensorRT then has nothing to build.
- String attributes reach the plugin with the NUL that TensorRT's ONNX parser appends to every string
  field (onnx-tensorrt ``copyField``), ``"fp8\\x00"``; int attributes as one int32.
- ``out_dtype`` is declared an int32 array, not ``int``: TensorRT 10.x's plugin creator turns an
  ``int`` field into ``int(field.data)``, a one-element array, which NumPy >= 2.4 refuses ("only
  0-dimensional arrays can be converted to Python scalars"); arrays are converted with ``astype``
  by every version.
"""

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from plugins import schema, tiles

QUANTIZE_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.QUANTIZE_PER_TOKEN}"
LINEAR_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.W8A8_LINEAR}"
AOT = hasattr(trtp, "aot_impl")  # TensorRT >= 10.9
_OUT_TYPES = {1: trt.float32, 10: trt.float16, 16: trt.bfloat16}  # out_dtype (ONNX TensorProto) -> TensorRT
_TRITON_TYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
Int32Attr = npt.NDArray[np.int32]  # an int attribute (see the module docstring)


def _fp8(qtype: str) -> bool:
    """The ``qtype`` attribute as TensorRT delivers it (see the module docstring) -> whether it is FP8."""
    value = qtype.rstrip("\x00")
    if value not in ("int8", "fp8"):
        raise ValueError(f"{QUANTIZE_ID}: attribute qtype is {value!r}; expected 'int8' or 'fp8'")
    return value == "fp8"


def _out_type(out_dtype: Int32Attr):
    values = np.asarray(out_dtype).reshape(-1).tolist()
    if len(values) != 1 or values[0] not in _OUT_TYPES:
        raise ValueError(f"{LINEAR_ID}: attribute out_dtype is {values}; expected one ONNX FLOAT (1), "
                         f"FLOAT16 (10) or BFLOAT16 (16)")
    return _OUT_TYPES[values[0]]


def _triton_type(dtype, op: str, what: str) -> str:
    if dtype not in _TRITON_TYPES:
        raise ValueError(f"{op}: {what} is {dtype.name}; the kernels take FLOAT, HALF or BF16")
    return _TRITON_TYPES[dtype]


def _constant(expr, what: str, op: str) -> int:
    """A build-time constant dimension (the AOT kernels are compiled for it)."""
    if not expr.is_constant:
        raise ValueError(f"{op}: the AOT kernel needs {what} to be a build-time constant")
    return int(expr.constant_value())


@trtp.register(QUANTIZE_ID)
def quantize_desc(x: trtp.TensorDesc, qtype: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    """``Q`` like ``X`` (int8 or fp8) and one float32 scale per token, ``[..., 1]``."""
    q = trtp.from_shape_expr(x.shape_expr, dtype=trt.fp8 if _fp8(qtype) else trt.int8)
    scale = trtp.from_shape_expr(trtp.ShapeExprs.from_tuple((*list(x.shape_expr)[:-1], 1)), dtype=trt.float32)
    return q, scale


@trtp.impl(QUANTIZE_ID)
def quantize_impl(x: trtp.Tensor, qtype: str, outputs: tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
    from plugins import trt_jit  # noqa: PLC0415 - torch and Triton, at run time only

    trt_jit.quantize(x, _fp8(qtype), outputs, stream)


@trtp.register(LINEAR_ID)
def linear_desc(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                bias: trtp.TensorDesc, out_dtype: Int32Attr) -> trtp.TensorDesc:
    """``Y [..., N]`` of type ``out_dtype`` for ``Q [..., K]`` and ``W [N, K]``."""
    shape = trtp.ShapeExprs.from_tuple((*list(q.shape_expr)[:-1], w.shape_expr[0]))
    return trtp.from_shape_expr(shape, dtype=_out_type(out_dtype))


@trtp.impl(LINEAR_ID)
def linear_impl(q: trtp.Tensor, x_scale: trtp.Tensor, w: trtp.Tensor, w_scale: trtp.Tensor, bias: trtp.Tensor,
                out_dtype: Int32Attr, outputs: tuple[trtp.Tensor], stream: int) -> None:
    # out_dtype is taken (and so serialized into the engine) only to keep the re-created plugin whole;
    # the output buffer's own type decides the kernel
    from plugins import trt_jit  # noqa: PLC0415

    trt_jit.linear(q, x_scale, w, w_scale, bias, outputs[0], stream)


@trtp.autotune(LINEAR_ID)
def linear_tactics(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                   bias: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    """The network's own types (checked: TensorRT would otherwise report only that no format fits),
    linear formats, and where AOT kernels exist one custom tactic per GEMM tile that fits."""
    y = outputs[0]
    if q.dtype not in (trt.int8, trt.fp8) or w.dtype != q.dtype:
        raise ValueError(f"{LINEAR_ID}: Q and W must both be INT8 or both FP8, got {q.dtype.name} and {w.dtype.name}")
    for name, desc in (("x_scale", x_scale), ("w_scale", w_scale), ("bias", bias)):
        if desc.dtype != trt.float32:
            raise ValueError(f"{LINEAR_ID}: {name} must be FLOAT, got {desc.dtype.name}")
    out = _triton_type(y.dtype, LINEAR_ID, "the output")
    types = ", ".join(d.dtype.name for d in (q, x_scale, w, w_scale, bias, y))
    n, k = w.shape_expr[0], w.shape_expr[1]
    if not (AOT and n.is_constant and k.is_constant):  # the JIT kernel tunes itself
        return [trtp.AutoTuneCombination(types, "LINEAR")]
    return [trtp.AutoTuneCombination(types, "LINEAR", _fitting_tactics(n.constant_value(), k.constant_value(),
                                                                       q.dtype == trt.fp8, out))]


def _fitting_tactics(n: int, k: int, fp8: bool, out: str) -> list[int]:
    """The tactics whose compiled kernel fits the shared-memory limit (compiled once; Triton caches)."""
    from plugins import aot  # noqa: PLC0415

    limit = tiles.shared_limit()
    fitting = [t for t in tiles.tactics()
               if limit is None or aot.linear_kernel(n, k, fp8, out, tiles.tactic_tile(t))[0].shared <= limit]
    if not fitting:
        raise ValueError(f"{LINEAR_ID}: no GEMM tile for N={n}, K={k} fits {limit} bytes of shared memory")
    return fitting


def _launch(kernel, grid_x, extra: tuple) -> tuple:
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.block_x = kernel.threads
    params.shared_mem = kernel.shared
    return kernel.name, kernel.ptx, params, trtp.SymIntExprs.from_tuple(extra)


if AOT:
    @trtp.aot_impl(QUANTIZE_ID)
    def quantize_aot(x: trtp.TensorDesc, qtype: str, outputs: tuple[trtp.TensorDesc, trtp.TensorDesc],
                     tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        from plugins import aot  # noqa: PLC0415 - Triton, at build time only

        k = _constant(x.shape_expr[x.ndim - 1], "the last dimension K", QUANTIZE_ID)
        kernel, grid = aot.quantize_kernel(_triton_type(x.dtype, QUANTIZE_ID, "X"), k, _fp8(qtype))
        return _launch(kernel, grid(x.shape_expr.numel() // k), ())

    @trtp.aot_impl(LINEAR_ID)
    def linear_aot(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                   bias: trtp.TensorDesc, out_dtype: Int32Attr, outputs: tuple[trtp.TensorDesc], tactic: int
                   ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        from plugins import aot  # noqa: PLC0415

        n = _constant(w.shape_expr[0], "N (the weight's rows)", LINEAR_ID)
        k = _constant(w.shape_expr[1], "K (the weight's columns)", LINEAR_ID)
        out = _triton_type(outputs[0].dtype, LINEAR_ID, "the output")
        kernel, grid = aot.linear_kernel(n, k, q.dtype == trt.fp8, out, tiles.tactic_tile(tactic))
        m = q.shape_expr.numel() // k
        return _launch(kernel, grid(m), (trtp.SymInt32(m),))
