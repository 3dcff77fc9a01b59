"""``python -m passes.smoothquant MODEL.onnx``: SmoothQuant an ONNX model.

Exit codes: 0 success, 1 bad input or failure (one line on stderr naming the problem), 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import passes

from passes.config import (DEFAULT_ALPHA_GRID, FAST_ALPHA, CalibrationConfig, Granularity, Precision, QuantizationConfig,
                           SmoothingConfig, SmoothQuantConfig, Target, Unfoldable, WeightRounding, WeightStorage)
from calibrators.data import model_inputs
from calibrators.text import TextLayout, load_tokenizer, read_text_file, text_feeds
from passes.search.clip import DEFAULT_CLIP_GRID
from passes.ir.onnx_io import load_model
from passes.ir.atomic import terminate_as_interrupt
from passes.ir.paths import check_outputs, data_files
from passes.build_engine import add_engine_arguments, build_prepared, engine_config_from_args, import_tensorrt, prepare
from passes.ir.errors import SmoothQuantError
from passes.search.alpha import summarize_choices
from passes.pipeline import SmoothQuantResult, default_output_path, run_smoothquant

LOGGER = "smoothquant"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passes.smoothquant", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="input ONNX model (never modified; external data is read in place)")
    p.add_argument("--version", action="version", version=f"smoothquant-onnx {passes.__version__}")
    p.add_argument("-o", "--output", help="output model (default: MODEL.sq.onnx, or MODEL.smooth.onnx with --smooth-only)")
    p.add_argument("--calib", help="calibration data: .npz (keys = input names, samples on axis 0) or a folder of them "
                                   "(default: MODEL.calib.npz beside the model)")
    text = p.add_argument_group("calibration from text (instead of --calib)")
    text.add_argument("--calib-text", metavar="FILE", help="a UTF-8 text file; paragraphs are separated by blank lines")
    text.add_argument("--tokenizer", metavar="DIR", help="the model's tokenizer (a folder with tokenizer.json)")
    text.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    text.add_argument("--samples", type=int, default=64, help="number of samples")
    text.add_argument("--text-layout", choices=[t.value for t in TextLayout], default=TextLayout.WINDOWS.value,
                      help="windows: running text cut into seq-len windows; paragraphs: one padded paragraph each")
    p.add_argument("--stats", action="append", help="reuse statistics saved by --stats-out instead of calibrating; "
                                                    "repeat to merge shards")
    p.add_argument("--stats-out", help="save the calibration statistics to this .npz")
    p.add_argument("--alpha", default="auto",
                   help="migration strength in [0, 1] for every group (one pass), or auto: per group, the best of "
                        "--alpha-grid, no smoothing, or the outlier split, by quantized error on the calibration data")
    p.add_argument("--alpha-grid", default=",".join(f"{a:g}" for a in DEFAULT_ALPHA_GRID),
                   help="candidates for --alpha auto, comma-separated")
    p.add_argument("--search-tokens", type=int, default=CalibrationConfig.search_tokens, metavar="N",
                   help="the searches measure their candidates on the first N calibration tokens (0: all)")
    p.add_argument("--fast", action="store_true",
                   help=f"the one-pass path: --alpha {FAST_ALPHA:g} (unless --alpha is given) and "
                        f"--weight-rounding nearest (unless given)")
    p.add_argument("--no-smoothing", action="store_true",
                   help="quantize without smoothing or outlier splits (the plain baseline)")
    p.add_argument("--unfoldable", choices=[u.value for u in Unfoldable], default=Unfoldable.AUTO.value,
                   help="groups no constant can absorb (or only by breaking a runtime fusion, like GELU's scalar "
                        "under --target onnxruntime): skip them, insert one explicit Mul, or split: quantize them "
                        "unsmoothed with their few outlier channels computed in FP. auto: split with --alpha auto "
                        "(the search keeps the split or no smoothing, whichever measures better, and offers the split "
                        "to every group with outlier channels; for INT8 on TensorRT also combined with the upper half "
                        "of --alpha-grid) and for --target onnxruntime; else skip, or mul where a fusion is the only "
                        "obstacle. An explicit skip or mul takes the split out of the search")
    p.add_argument("--split-ratio", type=float, default=SmoothingConfig.split_ratio, metavar="R",
                   help="with split: a channel is an outlier if its calibrated max|X| exceeds R times the 99th "
                        "percentile over the channels")
    p.add_argument("--fold-attention-values", action="store_true",
                   help="also smooth attention output projections, folding 1/s into the value projection "
                        "through P @ V (exact; the channel map is traced on one calibration sample)")
    p.add_argument("--precision", choices=[x.value for x in Precision], default=Precision.INT8.value,
                   help="W8A8 format: int8 (symmetric) or fp8 (E4M3FN; raises the opset to 19)")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.PER_TENSOR.value,
                   help="activation scales: per-tensor (static, calibrated Q/DQ) or per-token (computed at run time: "
                        "standard ops with --target onnxruntime, com.smoothquant custom ops for the TensorRT plugins)")
    p.add_argument("--target", choices=[t.value for t in Target], default=Target.TENSORRT.value,
                   help="runtime the Q/DQ are shaped for: tensorrt (symmetric, zero points 0) or onnxruntime "
                        "(asymmetric uint8 activations, which ORT's CPU kernels fuse)")
    p.add_argument("--weights", choices=[w.value for w in WeightStorage], default=WeightStorage.QUANTIZED.value,
                   help="store weights quantized (int8/float8 + DequantizeLinear, ~4x smaller) or as float "
                        "followed by QuantizeLinear -> DequantizeLinear")
    p.add_argument("--weight-rounding", choices=[r.value for r in WeightRounding], default=None,
                   help="nearest, or gptq: round each weight so the op's output error on the calibration data is "
                        "small (one more pass over the data; MatMul/Gemm weights). Default auto: gptq where the "
                        "calibration data can be read again, nearest with --fast")
    p.add_argument("--no-activation-shift", action="store_true",
                   help="TensorRT target: quantize one-sided activations (after GELU) symmetrically around 0 "
                        "instead of around their middle (by default X - c is quantized and c·ΣW added back)")
    p.add_argument("--quantize-tied", action="store_true",
                   help="also smooth and quantize MatMuls that read Transpose of a constant (a tied LM head reading "
                        "the embedding), on their own transposed copy; by default they stay FP")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep linear ops whose node name matches REGEX in FP (repeatable)")
    p.add_argument("--exclude-op-types", default="", metavar="TYPES",
                   help="keep every linear op of these types in FP, comma-separated (of MatMul, Gemm, Conv)")
    p.add_argument("--max-fp-layers", type=int, default=0, metavar="N",
                   help="keep up to N linear ops in FP whose quantized output error on the calibration data is "
                        "far above the rest (one more pass over the data)")
    p.add_argument("--clip", choices=["max", "search"], default="max",
                   help="activation ranges: the calibrated max, or per group the fraction of it (--clip-grid) whose "
                        "quantized output error on the calibration data is lowest")
    p.add_argument("--clip-grid", default=",".join(f"{r:g}" for r in DEFAULT_CLIP_GRID),
                   help="ratios for --clip search, comma-separated")
    p.add_argument("--no-check", action="store_true",
                   help="do not run the TensorRT rule checker on the output (--target tensorrt)")
    p.add_argument("--smooth-only", action="store_true", help="write the smoothed and folded FP model, no Q/DQ")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--engine", metavar="PLAN", help="also build a TensorRT engine from the output (needs the "
                                                    "tensorrt package and a GPU; options below)")
    add_engine_arguments(p.add_argument_group("TensorRT engine (with --engine)"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, notes or summary: errors and the "
                                                                "written files only (--log-level warning)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also every group and op one by one: what was smoothed, split or skipped and why "
                        "(--log-level debug)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default=None,
                   help="the log's threshold (default info: notes and one line per stage)")
    return p


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _log_level(args: argparse.Namespace) -> int:
    if args.log_level is not None:
        return LOG_LEVELS[args.log_level]
    return logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO


def _report(result: SmoothQuantResult, args: argparse.Namespace) -> None:
    """Notes, then per stage a headline (info) and its details (debug), through ``logging`` to stdout."""
    log = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stdout)  # this call's stdout (tests swap it)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(_log_level(args))
    log.propagate = False
    try:
        for message in result.messages:
            log.info("note: %s", message)
        summaries = [result.report.summary()] + ([result.quant_report.summary()] if result.quant_report else [])
        if result.alpha_choices:
            summaries.insert(1, summarize_choices(result.alpha_choices))
        if result.layer_errors:
            worst = sorted(result.layer_errors, key=lambda e: e.sqnr_db)[:5]
            summaries.append("lowest per-layer SQNR on calibration data: "
                             + ", ".join(f"{e.name} {e.sqnr_db:.1f} dB" for e in worst))
        hidden = 0
        for summary in summaries:
            head, *details = summary.splitlines()
            log.info(head)
            for line in details:
                log.debug(line)
            hidden += len(details)
        if hidden and not log.isEnabledFor(logging.DEBUG):
            log.info("(%d more lines, group by group: -v)", hidden)
    finally:
        log.removeHandler(handler)


def text_calibration(args: argparse.Namespace) -> list[dict]:
    """Feed dicts of ``--batch-size`` rows, ``--samples`` in all, tokenized from ``--calib-text``."""
    if not args.tokenizer:
        raise SmoothQuantError("--calib-text needs --tokenizer DIR (the folder holding tokenizer.json)")
    specs = model_inputs(load_model(args.model).proto)
    feeds = text_feeds(specs, read_text_file(args.calib_text), load_tokenizer(args.tokenizer), args.seq_len,
                       args.samples, TextLayout(args.text_layout))
    return [{k: v[i:i + args.batch_size] for k, v in feeds.items()} for i in range(0, args.samples, args.batch_size)]


def _smoothing_config(args: argparse.Namespace) -> SmoothingConfig:
    auto = args.alpha == "auto" and not args.fast
    try:
        grid = tuple(float(a) for a in args.alpha_grid.split(","))
        alpha = None if auto else FAST_ALPHA if args.alpha == "auto" else float(args.alpha)
    except ValueError:
        raise SmoothQuantError(f"--alpha {args.alpha!r} / --alpha-grid {args.alpha_grid!r}: expected numbers in "
                               f"[0, 1] (or --alpha auto)") from None
    return SmoothingConfig(alpha=alpha, unfoldable=Unfoldable(args.unfoldable), alpha_grid=grid,
                           enabled=not args.no_smoothing, split_ratio=args.split_ratio,
                           attention_values=args.fold_attention_values)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise SmoothQuantError(f"--clip-grid {text!r}: expected comma-separated numbers in (0, 1]") from None


def config_from_args(args: argparse.Namespace) -> SmoothQuantConfig:
    return SmoothQuantConfig(
        smoothing=_smoothing_config(args),
        calibration=CalibrationConfig(batch_size=args.batch_size, progress=not args.quiet,
                                      search_tokens=args.search_tokens or None),
        quantization=None if args.smooth_only else QuantizationConfig(
            precision=Precision(args.precision), target=Target(args.target), weights=WeightStorage(args.weights),
            exclude=tuple(args.exclude), max_fp_layers=args.max_fp_layers,
            exclude_op_types=tuple(t for t in args.exclude_op_types.split(",") if t), check=not args.no_check,
            clip_grid=_ratios(args.clip_grid) if args.clip == "search" else (),
            granularity=Granularity(args.granularity),
            weight_rounding=WeightRounding(args.weight_rounding or ("nearest" if args.fast else "auto")),
            quantize_tied=args.quantize_tied, activation_shift=not args.no_activation_shift),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    restore = terminate_as_interrupt()  # SIGTERM cleans up like Ctrl-C
    try:
        config = config_from_args(args)
        sources = [name for name, given in (("--calib", args.calib), ("--stats", args.stats),
                                            ("--calib-text", args.calib_text)) if given]
        if len(sources) > 1:
            raise SmoothQuantError(f"pass one of --calib, --stats or --calib-text, not {' and '.join(sources)}")
        if args.calib_text:  # read by this command before the pipeline sees them
            out = Path(args.output) if args.output else default_output_path(args.model, args.smooth_only)
            check_outputs({"output model": out, "output's external data": out.with_name(out.name + ".data"),
                           "--stats-out file": Path(args.stats_out) if args.stats_out else None,
                           "--engine file": Path(args.engine) if args.engine else None},
                          [Path(args.calib_text)] + (data_files(args.tokenizer) if args.tokenizer else []))
        calib = args.calib if not args.calib_text else text_calibration(args)
        engine_config = None
        if args.engine:
            if config.quantization is None or config.quantization.target is not Target.TENSORRT:
                raise SmoothQuantError("--engine builds TensorRT engines: drop --smooth-only / --target onnxruntime")
            engine_config = engine_config_from_args(args, check=False)  # the pipeline checks its own output
            import_tensorrt()  # fail before any work if TensorRT is missing
            prepare(args.model, args.engine, engine_config)  # profiles match the model's inputs
        result = run_smoothquant(args.model, args.output, calib=calib, stats=args.stats,
                             stats_out=args.stats_out, config=config)
        if engine_config is not None:
            loaded, command = prepare(result.written[0], args.engine, engine_config)
            print(f"trtexec equivalent: {command}", flush=True)
            result.written.append(build_prepared(loaded, args.engine, engine_config, command).engine)
    except SmoothQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        restore()
    _report(result, args)
    print(f"wrote {', '.join(str(p) for p in result.written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
