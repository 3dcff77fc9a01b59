"""Runs inside NNCF's own virtual environment (only numpy, onnx, nncf there):

    python nncf_quantize.py MODEL.onnx CALIB.npz OUT.onnx [--no-smooth-quant]

nncf.quantize with model_type=TRANSFORMER (its SmoothQuant on by default; alpha -1 turns it
off), calibration batches of 8 from the .npz. Prints one JSON line: seconds, peak RSS MB.
"""

import json
import sys
import time
from pathlib import Path

import nncf
import numpy as np
import onnx


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    model_path, calib_path, out_path = sys.argv[1:4]
    smooth = "--no-smooth-quant" not in sys.argv
    start = time.perf_counter()
    model = onnx.load(model_path)
    with np.load(calib_path) as z:
        arrays = {k: z[k] for k in z.files}
    n = next(iter(arrays.values())).shape[0]
    batches = [{k: v[i:i + 8] for k, v in arrays.items()} for i in range(0, n, 8)]
    params = None if smooth else nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    kwargs = {"advanced_parameters": params} if params is not None else {}
    quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=n, **kwargs)
    onnx.save(quantized, out_path)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "nncf": nncf.__version__}))


if __name__ == "__main__":
    main()
