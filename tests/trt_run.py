"""``trt_driver.py --run``: the built plugins executed on a GPU as TensorRT executes them.

JIT: ``enqueue(input_desc, output_desc, inputs, outputs, in_strides, out_strides, stream)`` with device
buffers (``IPluginV3OneRuntime::enqueue``; ``_plugin_class.py`` wraps them as ``tensorrt.plugin.Tensor``s).
AOT: the PTX from ``get_kernel`` loaded and launched through the CUDA driver (CuPy) with the grid,
block, shared memory and extra scalars that ``get_launch_params`` gave, arguments in TensorRT's order
(inputs, scalars, outputs), every tactic. Each node is fed the reference values of its inputs (the
model run by ``onnx.reference`` with :mod:`plugins.onnx_reference`) and its outputs are compared with
the reference's.
"""

from __future__ import annotations

import numpy as np
import torch

from plugins import aot
from trt_driver import SIZES, CheckFailed, check, concrete, plugin_desc

TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
         "FP8": torch.float8_e4m3fn}


def _device(value: np.ndarray, dtype: str) -> torch.Tensor:
    raw = value.view(np.int8) if value.dtype.itemsize == 1 and dtype in ("INT8", "FP8") else value
    return torch.from_numpy(np.ascontiguousarray(raw)).cuda().view(TORCH[dtype])


def _compare(op: str, tactic, got: list[torch.Tensor], want: list[np.ndarray], ins: list[dict],
             outs: list[dict]) -> dict:
    errors = {}
    fp8 = ins[0]["dtype"] == "FP8"
    for g, w, t in zip(got, want, outs):
        g = g.float().cpu().numpy() if t["dtype"] != "INT8" else g.cpu().numpy().astype(np.float32)
        w = w.astype(np.float32)
        if t["dtype"] in ("INT8", "FP8"):  # codes: ties may round apart
            errors[t["name"]] = float((g != w).mean())
            check(errors[t["name"]] < 1e-2, f"{op} tactic {tactic}: {errors[t['name']]:.3%} of {t['name']} differ")
        else:
            errors[t["name"]] = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
            bound = (1e-3 if fp8 else 1e-5) if op.endswith("Linear") else 1e-6  # FP8 MMA: fp32 sums, any order
            check(errors[t["name"]] < bound, f"{op} tactic {tactic}: {t['name']} relative error {errors[t['name']]}")
    return errors


def run_on_gpu(trt, spec: dict, impl: str, built: list) -> list[dict]:
    values = dict(np.load(spec["values"]))
    for name, dtype in spec["value_dtypes"].items():
        if dtype == "FP8":
            import ml_dtypes  # noqa: PLC0415

            values[name] = values[name].view(ml_dtypes.float8_e4m3fn)
    stream = torch.cuda.current_stream().cuda_stream
    results = []
    for node, plugin, kernels in built:
        op, ins, outs = node["op"], node["inputs"], node["outputs"]
        args = [_device(values[t["name"]], t["dtype"]) for t in ins]
        want = [values[t["name"]] for t in outs]
        for tactic in (kernels or {None: None}):
            ys = [torch.full(concrete(t["shape"], SIZES), 0, dtype=TORCH[t["dtype"]], device="cuda") for t in outs]
            if tactic is None:  # JIT
                plugin.set_tactic(0)
                plugin.enqueue([plugin_desc(trt, t, SIZES) for t in ins], [plugin_desc(trt, t, SIZES) for t in outs],
                               [a.data_ptr() for a in args], [y.data_ptr() for y in ys],
                               [trt.Dims(a.stride()) for a in args], [trt.Dims(y.stride()) for y in ys], stream)
            else:
                launch, ptx = kernels[tactic]
                lv = launch["launch"]
                check(lv["grid_y"] == lv["grid_z"] == lv["block_y"] == lv["block_z"] == 1,
                      f"{op}: the launch is not one-dimensional: {lv}")
                kernel = aot.AotKernel(launch["name"], ptx.decode(), lv["block_x"], lv["shared_mem"])
                aot.driver_launch(kernel, lv["grid_x"], (*args, *launch["scalars"], *ys), stream)
            torch.cuda.synchronize()
            results.append({"op": op, "tactic": tactic, "errors": _compare(op, tactic, ys, want, ins, outs)})
    if not results:
        raise CheckFailed("nothing ran")
    return results
