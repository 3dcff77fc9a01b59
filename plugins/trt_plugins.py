"""TensorRT plugins for the ``com.smoothquant`` ops (TensorRT >= 10.6 Python plugins, JIT).

Importing this module registers ``smoothquant::QuantizePerToken`` and ``smoothquant::W8A8Linear``
with TensorRT's plugin registry; TensorRT's ONNX parser then maps the custom nodes written by
``--granularity per-token --target tensorrt`` onto them (their ``plugin_namespace`` attribute).
``python -m passes.build_engine MODEL.onnx --python-plugins plugins.trt_plugins`` does that.

The implementations call the Triton kernels of :mod:`plugins.triton_kernels` on TensorRT's
stream, writing straight into TensorRT's output buffers. Schema: :mod:`plugins.schema`.

Status: written against the documented ``tensorrt.plugin`` API and **not run**: TensorRT cannot
be installed where this project is built and tested. The kernels themselves are tested on an
H200 through PyTorch. An AOT implementation (``tensorrt.plugin.aot_impl``, TensorRT >= 10.9:
PTX compiled from the Triton kernels, engines that run without Python) is not written yet.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from plugins import schema
from plugins import triton_kernels as tk

QUANTIZE_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.QUANTIZE_PER_TOKEN}"
LINEAR_ID = f"{schema.PLUGIN_NAMESPACE}::{schema.W8A8_LINEAR}"
_OUT_DTYPES = {1: (trt.float32, torch.float32), 10: (trt.float16, torch.float16), 16: (trt.bfloat16, torch.bfloat16)}


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
