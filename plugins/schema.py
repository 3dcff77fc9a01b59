"""The custom ops of the ``com.smoothquant`` domain: one place for their schema.

``--granularity per-token --target tensorrt`` lowers each quantized linear op to these two
ops; the TensorRT plugins of :mod:`plugins.trt_plugins` implement them with the Triton
kernels of :mod:`plugins.triton_kernels`, and :mod:`plugins.onnx_reference` runs them in
``onnx.reference`` (NumPy) for CPU tests. Semantics are those of :mod:`plugins.reference`.

``QuantizePerToken(X) -> (Q, scale)``
    X       float16/bfloat16/float32 ``[..., K]`` (already smoothed: the scales are folded offline;
            the Triton kernel can also multiply an unfolded smoothing vector in)
    Q       int8 or float8e4m3fn ``[..., K]``; scale float32 ``[..., 1]`` (one per token)
    attrs   ``qtype``: string ``"int8"`` (symmetric, [-127, 127], round half to even) or
            ``"fp8"`` (E4M3FN, saturating at 448)

``W8A8Linear(Q, x_scale, W, w_scale, bias) -> Y``
    Q       int8 / float8e4m3fn ``[..., K]``; x_scale float32 ``[..., 1]``
    W       int8 / float8e4m3fn ``[N, K]`` (constant, K-major: the layout the GEMM kernel reads)
    w_scale float32 ``[N]`` (per output channel); bias float32 ``[N]`` (zeros when the layer has none:
            TensorRT's Python plugins take a fixed number of inputs)
    Y       ``[..., N]`` of type ``out_dtype``: ``Y = (Q W^T) * x_scale * w_scale (+ bias)``
            with int32 (INT8) or fp32 (FP8) accumulation
    attrs   ``out_dtype``: int, an ONNX TensorProto data type (FLOAT, FLOAT16 or BFLOAT16)

Both nodes carry ``plugin_namespace="smoothquant"``: TensorRT's ONNX parser looks an unknown op
up as plugin ``<plugin_namespace>::<op_type>``, the ID the plugins register under.
"""

from __future__ import annotations

DOMAIN = "com.smoothquant"
PLUGIN_NAMESPACE = "smoothquant"
VERSION = 1
QUANTIZE_PER_TOKEN = "QuantizePerToken"
W8A8_LINEAR = "W8A8Linear"
