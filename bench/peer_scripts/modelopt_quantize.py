"""Runs inside ModelOpt's own virtual environment (nvidia-modelopt[onnx], onnxruntime CPU):

    python modelopt_quantize.py MODEL.onnx CALIB.npz OUT.onnx [--mode int8|fp8] [--method max|entropy] [--external-data]

``modelopt.onnx.quantization.quantize`` with CPU calibration (``calibration_eps=["cpu"]``), its
default calibration method unless ``--method`` names one, and the non-quantized parts kept fp32 (``high_precision_dtype="fp32"``;
its fp16 default makes every comparison on a CPU a comparison of fp16 emulation). Calibration
inputs: the whole .npz at once. Prints one JSON line: seconds, peak RSS MB, version.
"""

import sys
import time

from peer_common import load_arrays, report


def main() -> None:
    model_path, calib_path, out_path = sys.argv[1:4]
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "int8"
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else None
    start = time.perf_counter()
    import modelopt
    from modelopt.onnx.quantization import quantize

    quantize(model_path, quantize_mode=mode, calibration_data=load_arrays(calib_path), calibration_eps=["cpu"], calibration_method=method,
             high_precision_dtype="fp32", output_path=out_path, log_level="WARNING",
             use_external_data_format="--external-data" in sys.argv)
    report(start, modelopt=modelopt.__version__)


if __name__ == "__main__":
    main()
