"""Peak memory and time of calibration vs sample count, beside plain ONNX Runtime inference.

Each configuration runs in a fresh process (peak RSS is per process), on the demo
tiny_llama exported at sequence length ``--seq-len``:

    python -m bench.calib_memory [--samples 10 1000] [--json OUT.json]

Calibration fetches only [C] vectors, so its peak RSS must not grow with the sample count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parent.parent / ".cache" / "bench-demo"


def ensure_model() -> Path:
    path = DEMO / "tiny_llama.onnx"
    if not path.exists():
        from models.tiny import write_demo  # noqa: PLC0415

        write_demo(DEMO, ("tiny_llama",))
    return path


def child(mode: str, samples: int, seq_len: int, batch: int) -> dict:
    """Runs inside the measured process."""
    from calibrators import CalibrationData, collect_channel_stats  # noqa: PLC0415
    from models.tiny import TinyConfig, make_inputs  # noqa: PLC0415
    from passes.ir.graph import GraphView  # noqa: PLC0415
    from passes.linear import find_linear_ops  # noqa: PLC0415
    from passes.ir.onnx_io import TensorStore, load_model  # noqa: PLC0415
    from passes.smooth import stat_targets  # noqa: PLC0415

    path = ensure_model()
    feeds = make_inputs("tiny_llama", np.random.default_rng(0), samples, seq_len, TinyConfig())
    data_path = DEMO / f"calib_{samples}_{seq_len}.npz"
    np.savez(data_path, **feeds)
    del feeds
    loaded = load_model(path)
    start = time.perf_counter()
    if mode == "calibrate":
        view = GraphView(loaded.proto.graph, TensorStore(loaded))
        targets = stat_targets(view, find_linear_ops(view)[0])
        collect_channel_stats(loaded, targets, CalibrationData(data_path, batch), progress=False)
    else:
        import onnxruntime as ort  # noqa: PLC0415

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for feed in CalibrationData(data_path, batch).batches():
            session.run(None, feed)
    seconds = time.perf_counter() - start
    data_path.unlink()
    return {"mode": mode, "samples": samples, "seq_len": seq_len, "batch": batch, "seconds": round(seconds, 3),
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def peak_rss_kb() -> int:
    """This process image's peak RSS. (ru_maxrss would carry over the parent's from before exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(mode: str, samples: int, seq_len: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.calib_memory", "--child", mode, "--samples", str(samples),
                          "--seq-len", str(seq_len), "--batch-size", str(batch)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--child", choices=["calibrate", "inference"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.samples[0], args.seq_len, args.batch_size)))
        return 0
    ensure_model()
    rows = [measure(mode, n, args.seq_len, args.batch_size) for n in args.samples
            for mode in ("inference", "calibrate")]
    base = {r["mode"]: r for r in rows if r["samples"] == args.samples[0]}
    print(f"{'mode':<10} {'samples':>8} {'seconds':>8} {'peak RSS MB':>12} {'RSS vs fewest':>14}")
    for r in rows:
        r["rss_ratio_vs_fewest"] = round(r["peak_rss_mb"] / base[r["mode"]]["peak_rss_mb"], 3)
        print(f"{r['mode']:<10} {r['samples']:>8} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.1f} "
              f"{r['rss_ratio_vs_fewest']:>13.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
