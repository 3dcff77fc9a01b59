"""TensorRT plugins for the ``com.smoothquant`` ops (TensorRT >= 10.6 Python plugins; AOT from 10.9).

Importing this module registers ``smoothquant::QuantizePerToken`` and ``smoothquant::W8A8Linear``
with TensorRT's plugin registry; TensorRT's ONNX parser then maps the custom nodes written by
``--granularity per-token --target tensorrt`` onto them (their ``plugin_namespace`` attribute).
``python -m passes.build_engine MODEL.onnx`` imports it for such models.

Two implementations of each op; the engine builder picks one (``--plugin-impl``):

- AOT (default, TensorRT >= 10.9): ``aot_impl`` returns PTX compiled from the Triton kernels
  (:mod:`plugins.aot`) with its launch parameters; TensorRT embeds it in the engine, which then
  runs without Python. ``W8A8Linear`` offers the tiles of :data:`plugins.aot.LINEAR_TACTICS` as
  custom tactics, so TensorRT's autotuner picks the fastest per layer.
- JIT: ``impl`` calls the Triton kernels of :mod:`plugins.triton_kernels` on TensorRT's stream,
  writing straight into TensorRT's output buffers.

Schema: :mod:`plugins.schema`.

Status: written against the documented ``tensorrt.plugin`` API and **not run under TensorRT**:
TensorRT cannot be installed where this project is built and tested. The JIT kernels are tested
on an H100/H200 through PyTorch; the AOT kernels are compiled to PTX and launched there through
the CUDA driver with exactly the arguments, grid and shared memory returned here
(``tests/test_kernels.py``), which is what TensorRT's launcher is documented to do.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from plugins import aot, schema
from plugins import triton_kernels as tk

QUANTIZE_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.QUANTIZE_PER_TOKEN}"
LINEAR_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.W8A8_LINEAR}"
_OUT_DTYPES = {1: (trt.float32, torch.float32), 10: (trt.float16, torch.float16), 16: (trt.bfloat16, torch.bfloat16)}
_TRITON_TYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}


def _constant(expr, what: str, op: str) -> int:
    """A build-time constant dimension (the AOT kernels are compiled for it)."""
    if not expr.is_constant:
        raise ValueError(f"{op}: the AOT kernel needs {what} to be a build-time constant")
    return int(expr.constant_value())


def _launch(kernel: aot.AotKernel, grid_x, extra: list) -> tuple:
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.block_x = kernel.threads
    params.shared_mem = kernel.shared
    return kernel.name, kernel.ptx, params, trtp.SymIntExprs.from_tuple(extra)


@trtp.register(QUANTIZE_ID)
def _quantize_desc(x: trtp.TensorDesc, qtype: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    q = trtp.from_shape_expr(x.shape_expr, dtype=trt.fp8 if qtype == "fp8" else trt.int8)
    dims = list(x.shape_expr)
    scale = trtp.from_shape_expr(trtp.ShapeExprs.from_tuple((*dims[:-1], 1)), dtype=trt.float32)
    return q, scale


@trtp.impl(QUANTIZE_ID)
def _quantize_impl(x: trtp.Tensor, qtype: str, outputs: tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        xt = torch.as_tensor(x, device="cuda")
        k = xt.shape[-1]
        q_out = torch.as_tensor(outputs[0], device="cuda").view(-1, k)
        s_out = torch.as_tensor(outputs[1], device="cuda").view(-1)
        tk.quantize_per_token(xt.reshape(-1, k), fp8=qtype == "fp8", out=(q_out, s_out))


@trtp.register(LINEAR_ID)
def _linear_desc(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                 bias: trtp.TensorDesc, out_dtype: int) -> trtp.TensorDesc:
    dims = list(q.shape_expr)
    shape = trtp.ShapeExprs.from_tuple((*dims[:-1], w.shape_expr[0]))
    return trtp.from_shape_expr(shape, dtype=_OUT_DTYPES[out_dtype][0])


@trtp.impl(LINEAR_ID)
def _linear_impl(q: trtp.Tensor, x_scale: trtp.Tensor, w: trtp.Tensor, w_scale: trtp.Tensor, bias: trtp.Tensor,
                 out_dtype: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        qt, wt = torch.as_tensor(q, device="cuda"), torch.as_tensor(w, device="cuda")
        k, n = qt.shape[-1], wt.shape[0]
        out = torch.as_tensor(outputs[0], device="cuda").view(-1, n)
        tk.w8a8_gemm(qt.reshape(-1, k), torch.as_tensor(x_scale, device="cuda").reshape(-1), wt,
                     torch.as_tensor(w_scale, device="cuda"), torch.as_tensor(bias, device="cuda"),
                     out_dtype=_OUT_DTYPES[out_dtype][1], out=out)


@trtp.aot_impl(QUANTIZE_ID)
def _quantize_aot(x: trtp.TensorDesc, qtype: str, outputs: tuple[trtp.TensorDesc, trtp.TensorDesc],
                  tactic: int) -> tuple:
    k = _constant(x.shape_expr[x.ndim - 1], "the last dimension K", QUANTIZE_ID)
    kernel, grid = aot.quantize_kernel(_TRITON_TYPES[x.dtype], k, qtype == "fp8")
    return _launch(kernel, grid(x.shape_expr.numel() // k), [])


@trtp.autotune(LINEAR_ID)
def _linear_tactics(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                    bias: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list:
    return [trtp.AutoTuneCombination(tactics=range(1, len(aot.LINEAR_TACTICS) + 1))]


@trtp.aot_impl(LINEAR_ID)
def _linear_aot(q: trtp.TensorDesc, x_scale: trtp.TensorDesc, w: trtp.TensorDesc, w_scale: trtp.TensorDesc,
                bias: trtp.TensorDesc, out_dtype: int, outputs: tuple[trtp.TensorDesc], tactic: int) -> tuple:
    n = _constant(w.shape_expr[0], "N (the weight's rows)", LINEAR_ID)
    k = _constant(w.shape_expr[1], "K (the weight's columns)", LINEAR_ID)
    kernel, grid = aot.linear_kernel(n, k, q.dtype == trt.fp8, _TRITON_TYPES[outputs[0].dtype], aot.tactic_tile(tactic))
    m = q.shape_expr.numel() // k
    return _launch(kernel, grid(m), [trtp.SymInt32(m)])
