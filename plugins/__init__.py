"""Runtime plugins (per-token quantization, W8A8 GEMM kernels, TensorRT plugins).

Not built yet: tracked by the runtime-plugins issue. Nothing here is imported by the passes.
"""
