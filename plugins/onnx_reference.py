"""The ``com.smoothquant`` custom ops for ``onnx.reference.ReferenceEvaluator`` (NumPy, CPU).

Lets a model lowered for the TensorRT plugins (``--granularity per-token --target tensorrt``)
run on any machine, so tests check its numbers against :mod:`plugins.reference`::

    ReferenceEvaluator(model, new_ops=CUSTOM_OPS).run(None, feeds)
"""

from __future__ import annotations

from onnx import helper
from onnx.reference.op_run import OpRun

from plugins import reference, schema


class QuantizePerToken(OpRun):
    op_domain = schema.DOMAIN

    def _run(self, x, qtype=None, plugin_namespace=None):
        qt = reference.QType(qtype)
        flat = x.reshape(-1, x.shape[-1])
        q, scale = reference.quantize_per_token(flat, qt)
        return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


class W8A8Linear(OpRun):
    op_domain = schema.DOMAIN

    def _run(self, q, x_scale, w, w_scale, bias, out_dtype=None, plugin_namespace=None):
        flat = q.reshape(-1, q.shape[-1])
        y = reference.w8a8_gemm(flat, x_scale.reshape(-1), w, w_scale, bias)
        dtype = helper.tensor_dtype_to_np_dtype(out_dtype)
        return (y.reshape(*q.shape[:-1], w.shape[0]).astype(dtype),)


CUSTOM_OPS = [QuantizePerToken, W8A8Linear]
