"""Runs inside NNCF's own virtual environment (only numpy, onnx, nncf there):

    python nncf_quantize.py MODEL.onnx CALIB.npz OUT.onnx [--no-smooth-quant]

nncf.quantize with model_type=TRANSFORMER (its SmoothQuant on by default; alpha -1 turns it
off), calibration batches of 8 from the .npz. Prints one JSON line: seconds, peak RSS MB.
"""

import sys
import time

import nncf
import onnx
from peer_common import batches, report


def main() -> None:
    model_path, calib_path, out_path = sys.argv[1:4]
    smooth = "--no-smooth-quant" not in sys.argv
    start = time.perf_counter()
    model = onnx.load(model_path)
    feeds = batches(calib_path)
    n = sum(len(next(iter(f.values()))) for f in feeds)
    params = None if smooth else nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    kwargs = {"advanced_parameters": params} if params is not None else {}
    quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=n, **kwargs)
    onnx.save(quantized, out_path)
    report(start, nncf=nncf.__version__)


if __name__ == "__main__":
    main()
