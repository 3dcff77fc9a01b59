"""The graph IR every pass and calibrator reads: loading and saving models (:mod:`onnx_io`), the
graph index (:mod:`graph`), inserted names (:mod:`naming`) and the one error type (:mod:`errors`).

It depends on nothing else in the project, so calibrators and passes both build on it without
depending on each other's rewrites.
"""
