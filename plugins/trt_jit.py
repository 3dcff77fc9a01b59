"""The JIT side of the TensorRT plugins: TensorRT's buffers as torch tensors, the Triton kernels on its stream.

``tensorrt.plugin.Tensor`` offers ``__cuda_array_interface__``, but refuses BF16 and FP8 (NumPy has no
such type; ``_tensor.py``: "Handling FP8 via '__cuda_array_interface__' is not supported"), and the
per-token ops carry FP8 codes and may take BF16 activations. :func:`cuda_array_interface` describes any
buffer as signed integers of its element size instead, and :func:`as_torch` views those as the real type.
"""

from __future__ import annotations

import tensorrt as trt
import torch

from plugins import triton_kernels as tk

TORCH_TYPES = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
               trt.int8: torch.int8, trt.fp8: torch.float8_e4m3fn, trt.int32: torch.int32}
_INT_OF_SIZE = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}


def cuda_array_interface(tensor) -> dict:
    """Version 3 of the CUDA array interface for a ``tensorrt.plugin.Tensor``, typed as integers of its
    element size; strides in bytes; no stream (the caller runs on TensorRT's stream)."""
    if tensor.dtype not in TORCH_TYPES:
        raise ValueError(f"a {tensor.dtype.name} tensor: the smoothquant kernels take {[t.name for t in TORCH_TYPES]}")
    size = TORCH_TYPES[tensor.dtype].itemsize
    return {"shape": tuple(tensor.shape), "typestr": _INT_OF_SIZE[size], "data": (tensor.data_ptr, False),
            "strides": tuple(s * size for s in tensor.strides), "stream": None, "version": 3}


class _Buffer:
    def __init__(self, tensor):
        self.__cuda_array_interface__ = cuda_array_interface(tensor)


def as_torch(tensor) -> torch.Tensor:
    """A torch view of TensorRT's buffer (no copy)."""
    return torch.as_tensor(_Buffer(tensor), device="cuda").view(TORCH_TYPES[tensor.dtype])


def quantize(x, fp8: bool, outputs, stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        xt = as_torch(x)
        k = xt.shape[-1]
        q, scale = as_torch(outputs[0]).view(-1, k), as_torch(outputs[1]).view(-1)
        tk.quantize_per_token(xt.reshape(-1, k), fp8=fp8, out=(q, scale))


def linear(q, x_scale, w, w_scale, bias, y, stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        qt, wt = as_torch(q), as_torch(w)
        k, n = qt.shape[-1], wt.shape[0]
        out = as_torch(y)
        tk.w8a8_gemm(qt.reshape(-1, k), as_torch(x_scale).reshape(-1), wt, as_torch(w_scale), as_torch(bias),
                     out_dtype=out.dtype, out=out.view(-1, n))
