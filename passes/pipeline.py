"""The whole run: load, calibrate, smooth, fold, quantize, save. The CLI is a thin wrapper.

>>> from passes import run_smoothquant, SmoothQuantConfig, SmoothingConfig
>>> result = run_smoothquant("model.onnx", calib="model.calib.npz",
...                      config=SmoothQuantConfig(SmoothingConfig(alpha=0.8)))  # doctest: +SKIP
>>> print(result.report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

from calibrators.data import CalibrationData, Feed
from calibrators.calibrate import calibrate
from calibrators.minmax import inference_session
from calibrators.stats import ChannelStats
from passes.search.alpha import AlphaChoice, search_alpha
from passes.check_trt import check_graph
from passes.search.clip import ClipChoice, search_clipping
from passes.config import Granularity, QuantizationConfig, SmoothQuantConfig, Target, WeightRounding
from passes.ir.errors import SmoothQuantError
from passes.fold import GroupResult, SmoothingReport, fold_smoothing
from passes.hessians import gram_requests, report_hessians, weight_hessians
from passes.ir.graph import GraphView, ensure_opset_import, opset_version
from passes.linear import LinearOp, find_linear_ops
from passes.ir.onnx_io import LoadedModel, TensorStore, inline_external_data, load_model, model_from_proto, save_model
from passes.ir.paths import check_outputs, data_files, model_files
from passes.ort_lowering import MS_DOMAIN, MS_VERSION, lower_for_onnxruntime
from passes.ir.naming import NameFactory
from passes.patterns import AttentionValueFold, FoldKind, LinearOutputFold
from passes.per_token import quantize_per_token
from passes.qdq import FORMATS, ActivationRange, QuantReport, quantize_linear_ops
from passes.search.sensitivity import LayerError, choose_fp_layers, measure_layer_errors
from passes.smooth import (PlannedGroup, SmoothingGroup, find_groups, plan_smoothing, smoothed_range, stat_targets,
                           without_site)
from passes.split import SplitOp, masked_hessians, plan_split, split_outliers
from passes.untie import retie, untie_transposed_weights
from passes.validate import validate_written_model
from passes.value_fold import trace_value_channels
from plugins import schema as plugin_schema

CalibSource = str | os.PathLike | Iterable[Feed]


@dataclass
class SmoothQuantResult:
    model: onnx.ModelProto  # the output graph (tensors that were external stay external)
    report: SmoothingReport
    stats: ChannelStats
    quant_report: QuantReport | None = None  # None: smooth only
    layer_errors: list[LayerError] = field(default_factory=list)  # measured when max_fp_layers > 0
    alpha_choices: list[AlphaChoice] = field(default_factory=list)  # with the per-group search (alpha=None)
    clip_choices: list[ClipChoice] = field(default_factory=list)  # with QuantizationConfig.clip_grid
    written: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def default_output_path(model_path: str | os.PathLike, smooth_only: bool) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.{'smooth' if smooth_only else 'sq'}.onnx")


def default_calibration_path(model_path: str | os.PathLike) -> Path | None:
    """``<stem>.calib.npz`` or a ``<stem>.calib/`` folder beside the model, if present."""
    path = Path(model_path)
    for candidate in (path.with_name(f"{path.stem}.calib.npz"), path.with_name(f"{path.stem}.calib")):
        if candidate.exists():
            return candidate
    return None


def run_smoothquant(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None = None, *,
                base_dir: str | os.PathLike | None = None,
                calib: CalibSource | None = None, stats: ChannelStats | Sequence[str | os.PathLike] | None = None,
                stats_out: str | os.PathLike | None = None, config: SmoothQuantConfig = SmoothQuantConfig(),
                write: bool = True) -> SmoothQuantResult:
    """Smooth (and, unless ``config.quantization`` is None, quantize) ``model``.

    ``calib``: an .npz, a folder of them, or an iterable of feed dicts; defaults to
    ``<stem>.calib.npz`` beside the model. ``stats``: statistics to use instead of
    calibrating (a :class:`ChannelStats` or files written by ``stats_out``, merged).
    The input file is never modified; the output is written atomically.
    ``model`` may be an ``onnx.ModelProto`` (``base_dir``: where its external data lies; it is not
    modified); it then needs ``output`` unless ``write=False``. With ``write=False`` nothing is
    written and ``result.model`` stands alone (its tensors inline, up to protobuf's 2 GiB).
    """
    if isinstance(model, onnx.ModelProto):
        loaded = model_from_proto(model, base_dir)
        if write and output is None:
            raise SmoothQuantError("an in-memory model needs an output path (output=...), or write=False")
    else:
        loaded = load_model(model)
    smooth_only = config.quantization is None
    out_path = Path(output) if output is not None else default_output_path(loaded.path, smooth_only)
    reads = model_files(loaded.proto, loaded.path) + data_files(
        calib if calib is not None else default_calibration_path(loaded.path))
    reads += data_files(list(stats)) if stats is not None and not isinstance(stats, ChannelStats) else []
    check_outputs({"output model": out_path if write else None,
                   "output's external data": out_path.with_name(out_path.name + ".data") if write else None,
                   "--stats-out file": Path(stats_out) if stats_out is not None else None}, reads)

    rereads = config.quantization is not None and (config.quantization.max_fp_layers > 0
                                                   or config.quantization.clip_grid
                                                   or config.quantization.weight_rounding is WeightRounding.GPTQ)
    if rereads and _one_pass_only(calib):
        raise SmoothQuantError("--max-fp-layers, --clip search and --weight-rounding gptq read the calibration data "
                               "more than once: pass a list of feeds, an .npz or a folder, not an iterator")
    if rereads and not _has_calibration(loaded, calib):
        raise SmoothQuantError(f"{loaded.path}: --max-fp-layers, --clip search and --weight-rounding gptq run the "
                               f"model on calibration data, which statistics alone (--stats) do not replace: pass "
                               f"--calib DATA or --calib-text FILE")
    # The automatic choices (the α search, GPTQ where possible) need data they can read again.
    config, messages = config.resolved(_has_calibration(loaded, calib) and not _one_pass_only(calib))
    if config.quantization is not None:
        need, why = FORMATS[config.quantization.precision].min_opset, config.quantization.precision.name
        if _has_half_floats(loaded.proto) and need < 19:
            need, why = 19, "fp16/bf16 activations (QuantizeLinear takes them from opset 19)"
        if opset_version(loaded.proto) < need:
            messages.append(f"converted from opset {opset_version(loaded.proto)} to {need} for {why}")
            loaded = convert_opset(loaded, need)
    view = GraphView(loaded.proto.graph, TensorStore(loaded))
    untied = untie_transposed_weights(view) if not smooth_only and config.quantization.quantize_tied else []
    messages += [f"{view.node_label(u.op)} reads Transpose({u.source!r}) (a tied embedding): it gets its own "
                 f"transposed copy {u.weight!r} to be smoothed and quantized" for u in untied]
    linear_ops, passed_over = find_linear_ops(view)
    messages += [f"{view.node_label(node)} is left as it is: {reason}" for node, reason in passed_over]
    # ONNX Runtime fuses GELU & co. only with their scalar constants: keep those for its target.
    ort = config.quantization is not None and config.quantization.target is Target.ONNXRUNTIME
    groups = find_groups(view, linear_ops, config.unfoldable, fold_scalars=not ort,
                         attention_values=config.smoothing.attention_values)
    needs_stats = any(g.site is not None for g in groups) or not smooth_only

    if not linear_ops:
        messages.append(f"{loaded.path}: no MatMul/Gemm/Conv with a constant weight; nothing to smooth")
    channel_stats, grams = ChannelStats(), {}
    if needs_stats or stats_out is not None:
        channel_stats, grams = _get_stats(loaded, view, linear_ops, calib, stats, config)
        if stats_out is not None:
            channel_stats.save(stats_out)
    groups = _trace_value_paths(loaded, view, groups, calib, config)
    planned, skipped, alpha_choices = _plan(loaded, view, groups, channel_stats, calib, config)
    to_split, skipped = _plan_splits(view, skipped, planned, channel_stats, config.smoothing.split_ratio)
    exclude = {g.activation: idx for g, idx in to_split}
    clip_choices = []
    if not smooth_only and config.quantization.clip_grid:
        clip_choices = search_clipping(loaded, loaded.proto, [g for g in groups if g.activation not in exclude],
                                       planned, channel_stats,
                                       opset_version(loaded.proto), config.quantization,
                                       _calibration_data(loaded, calib, config), config.quantization.clip_grid,
                                       max_tokens=config.calibration.search_tokens,
                                       progress=config.calibration.progress)
    report = fold_smoothing(view, planned, skipped)
    splits = _apply_splits(view, to_split, channel_stats, report)
    _record_rescaled_outputs(loaded.proto, planned, [g for g, _ in to_split])
    if linear_ops and config.smoothing.enabled and not any(g.site is not None for g in groups):
        messages.append(f"{loaded.path}: no smoothable pattern (norm or linear producer feeding linear ops); "
                        + ("the model is written unchanged" if smooth_only else "it is quantized unsmoothed"))
    quant_report, layer_errors = None, []
    if not smooth_only:
        quant_report, layer_errors = _quantize(loaded, view, groups, planned, channel_stats, linear_ops, calib,
                                               config, messages, {c.activation: c.ratio for c in clip_choices},
                                               exclude, splits, grams)
    messages += [f"{name}: neither smoothed nor quantized, reads Transpose of the tied weight again"
                 for name in retie(view, untied)]
    result = SmoothQuantResult(loaded.proto, report, channel_stats, quant_report, layer_errors, alpha_choices,
                               clip_choices, messages=messages)
    if not write and not inline_external_data(loaded.proto, loaded.base_dir):
        messages.append(f"the model's tensors over 2 GiB still point at external data in {loaded.base_dir}: "
                        f"write it (write=True) to keep it")
    if write:
        how = []
        result.written = save_model(loaded.proto, out_path, loaded.base_dir, inline_in_source=loaded.lazy_inline,
                                    validate=lambda p: how.append(validate_written_model(p, out_path)))
        if "session" not in how[0]:
            messages.append(f"{out_path}: validated by the {how[0]}")
    return result


def _has_half_floats(model: onnx.ModelProto) -> bool:
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type in half for v in list(model.graph.input) + list(model.graph.output))


def convert_opset(loaded: LoadedModel, opset: int) -> LoadedModel:
    """The model at ``opset`` through onnx's version converter, checked by building an ORT session on it."""
    try:
        converted = onnx.version_converter.convert_version(loaded.proto, opset)
        inference_session(converted, loaded.base_dir)
    except Exception as e:  # the converter and ORT raise many types
        raise SmoothQuantError(f"{loaded.path}: could not convert to opset {opset} ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return LoadedModel(converted, loaded.path, loaded.lazy_inline)


RESCALED_OUTPUTS_KEY = "smoothquant.rescaled_outputs"


def _record_rescaled_outputs(model: onnx.ModelProto, planned: list[PlannedGroup],
                             split: list[SmoothingGroup]) -> None:
    """Note in the model's metadata the linear-op outputs that differ from the FP model's by design,
    so layer-wise comparisons skip them: those smoothing divided by s (a producing layer absorbed
    1/s), and the partial sums of split ops (the FP channels' term is added after them)."""
    rescaled = sorted({p.group.site.producer.node.output[0] for p in planned
                       if isinstance(p.group.site, (LinearOutputFold, AttentionValueFold))}
                      | {op.node.output[0] for g in split for op in g.consumers})
    for prop in list(model.metadata_props):
        if prop.key == RESCALED_OUTPUTS_KEY:
            model.metadata_props.remove(prop)
    if rescaled:
        model.metadata_props.add(key=RESCALED_OUTPUTS_KEY, value=json.dumps(rescaled))


def _trace_value_paths(loaded: LoadedModel, view: GraphView, groups: list[SmoothingGroup], calib: CalibSource | None,
                       config: SmoothQuantConfig) -> list[SmoothingGroup]:
    """Groups folded into an attention value projection get their channel map (one model run on
    one calibration sample, :mod:`passes.value_fold`); a path that cannot be traced is unfoldable."""
    at = [i for i, g in enumerate(groups) if isinstance(g.site, AttentionValueFold)]
    if not at or not config.smoothing.enabled:
        return groups
    if not _has_calibration(loaded, calib):
        traced = ["tracing the attention layout needs calibration data (--calib)"] * len(at)
    elif _one_pass_only(calib):
        traced = ["tracing the attention layout reads a calibration sample again: pass a list of feeds, "
                  "an .npz or a folder, not an iterator"] * len(at)
    else:
        traced = trace_value_channels(loaded, view, [groups[i].site for i in at],
                                      _calibration_data(loaded, calib, config))
    out = list(groups)
    for i, found in zip(at, traced):
        out[i] = without_site(groups[i], found, config.unfoldable) if isinstance(found, str) \
            else replace(groups[i], site=found)
    return out


def _plan(loaded: LoadedModel, view: GraphView, groups: list[SmoothingGroup], stats: ChannelStats,
          calib: CalibSource | None, config: SmoothQuantConfig):
    """Scales per group: one α, a per-group search, or no smoothing at all."""
    if not config.smoothing.enabled:
        return [], [replace(g, site=None, skip_reason="smoothing disabled", split=False) for g in groups], []
    if not config.smoothing.searched:
        return (*plan_smoothing(view, groups, stats, config.smoothing), [])
    return search_alpha(loaded, loaded.proto, view, groups, stats, opset_version(loaded.proto), config.quantization,
                        _calibration_data(loaded, calib, config), config.smoothing.alpha_grid,
                        split_ratio=config.split_ratio, max_tokens=config.calibration.search_tokens,
                        progress=config.calibration.progress)


def _quantize(loaded: LoadedModel, view: GraphView, groups: list[SmoothingGroup], planned: list[PlannedGroup],
              stats: ChannelStats, linear_ops, calib: CalibSource | None, config: SmoothQuantConfig,
              messages: list[str], clip: dict[str, float], exclude: dict[str, np.ndarray],
              splits: list[SplitOp], grams: dict[str, np.ndarray]) -> tuple[QuantReport, list[LayerError]]:
    """Exclusions, the sensitivity fallback, Q/DQ placement and the TensorRT self-check."""
    qconfig: QuantizationConfig = config.quantization
    opset = opset_version(loaded.proto)
    ranges = tensor_ranges_after_smoothing(groups, planned, stats, clip, exclude)
    kept_fp: list[tuple[str, str]] = []
    candidates = []
    for op in linear_ops:
        why = qconfig.why_kept_fp(op.name, op.node.op_type)
        if why is None:
            candidates.append(op)
        else:
            kept_fp.append((op.name, why))
    for pattern in qconfig.exclude:
        if not any(re.search(pattern, op.name) for op in linear_ops):
            messages.append(f"--exclude {pattern!r} matches no linear op (names look like {linear_ops[0].name!r})"
                            if linear_ops else f"--exclude {pattern!r} matches no linear op")
    if qconfig.granularity is Granularity.PER_TOKEN:
        hessians = _weight_hessians(loaded, view, candidates, planned, grams, calib, config, messages)
        quant_report = quantize_per_token(view, candidates, opset, qconfig, hessians,
                                          progress=config.calibration.progress)
        report_hessians(hessians, messages)
        quant_report.skipped[:0] = kept_fp
        if qconfig.target is Target.TENSORRT and quant_report.quantized:
            ensure_opset_import(loaded.proto, plugin_schema.DOMAIN, plugin_schema.VERSION)
        return quant_report, []
    errors: list[LayerError] = []
    if qconfig.max_fp_layers > 0:
        data = _calibration_data(loaded, calib, config)
        errors = measure_layer_errors(loaded, loaded.proto, candidates, ranges, opset, qconfig, data,
                                      progress=config.calibration.progress)
        median = float(np.median([e.sqnr_db for e in errors])) if errors else float("nan")
        fallback = {e.name: e for e in choose_fp_layers(errors, qconfig.max_fp_layers)}
        candidates = [op for op in candidates if op.name not in fallback]
        kept_fp += [(name, f"sensitivity fallback: SQNR {e.sqnr_db:.1f} dB vs median {median:.1f} dB")
                    for name, e in fallback.items()]
    hessians = _weight_hessians(loaded, view, candidates, planned, grams, calib, config, messages)
    quant_report = quantize_linear_ops(view, candidates, ranges, opset, qconfig, masked_hessians(hessians, splits),
                                       progress=config.calibration.progress)
    report_hessians(hessians, messages)
    quant_report.skipped[:0] = kept_fp
    if qconfig.target is Target.ONNXRUNTIME:
        lowering = lower_for_onnxruntime(view)
        if lowering.lowered:
            ensure_opset_import(loaded.proto, MS_DOMAIN, MS_VERSION)
            messages.append(lowering.summary())
    if qconfig.check and qconfig.target is Target.TENSORRT:
        check = check_graph(view, opset)
        if not check.ok:
            raise SmoothQuantError(f"{loaded.path}: the quantized graph breaks TensorRT's rules (nothing written):\n"
                                   + "\n".join(f"  {v}" for v in check.violations))
    return quant_report, errors


def _weight_hessians(loaded: LoadedModel, view: GraphView, ops: list[LinearOp], planned: list[PlannedGroup],
                     grams: dict[str, np.ndarray], calib: CalibSource | None, config: SmoothQuantConfig,
                     messages: list[str]):
    """For GPTQ rounding (:mod:`passes.hessians`); None for nearest rounding."""
    if config.quantization.weight_rounding is not WeightRounding.GPTQ:
        return None
    return weight_hessians(loaded, view, ops, planned, grams, _calibration_data(loaded, calib, config), messages,
                           progress=config.calibration.progress)


def tensor_ranges_after_smoothing(groups: list[SmoothingGroup], planned: list[PlannedGroup], stats: ChannelStats,
                                  clip: dict[str, float] | None = None,
                                  exclude: dict[str, np.ndarray] | None = None) -> dict[str, ActivationRange]:
    """Per-tensor range of each linear op's (current) input after smoothing (see :func:`smoothed_range`),
    times the group's clipping ratio if one was chosen; ``exclude``: channels split off to FP."""
    scales = {p.group.activation: p.scales for p in planned}
    ranges = {}
    for group in groups:
        if group.activation not in stats.amax:
            continue
        rng = smoothed_range(stats, group.activation, scales.get(group.activation, 1.0),
                             (exclude or {}).get(group.activation))
        rng = rng.scaled((clip or {}).get(group.activation, 1.0))
        for op in group.consumers:
            ranges[op.node.input[0]] = rng
    return ranges


def _plan_splits(view: GraphView, skipped: list[SmoothingGroup], planned: list[PlannedGroup], stats: ChannelStats,
                 ratio: float) -> tuple[list[tuple[SmoothingGroup, np.ndarray]], list[SmoothingGroup]]:
    """The groups marked for a split, with their outlier channels: unsmoothed ones (``skipped``) and
    smoothed ones the search also split (split+α, ``planned``). A skipped group whose input has no
    outlier channels (or whose ops forbid the split) stays skipped, with the reason; the others
    in ``skipped`` come back as they are."""
    to_split, rest = [], []
    for group, smoothed in [(g, False) for g in skipped] + [(p.group, True) for p in planned]:
        if not group.split:
            rest += [] if smoothed else [group]
            continue
        found = plan_split(view, list(group.consumers), stats.amax.get(group.activation), ratio)
        if not isinstance(found, str):
            to_split.append((group, found))
        elif smoothed:  # the search measured these very channels: cannot happen
            raise SmoothQuantError(f"{group.activation}: the split the search chose is gone ({found})")
        else:
            rest.append(replace(group, split=False, skip_reason=f"{group.skip_reason}; {found}"))
    return to_split, rest


def _apply_splits(view: GraphView, to_split: list[tuple[SmoothingGroup, np.ndarray]], stats: ChannelStats,
                  report: SmoothingReport) -> list[SplitOp]:
    names = NameFactory(view.all_names())
    done = []
    reported = {r.activation: i for i, r in enumerate(report.groups)}  # the smoothed groups fold_smoothing reported
    for group, idx in to_split:
        done += split_outliers(view, list(group.consumers), group.activation, idx, names)
        amax = stats.amax[group.activation]
        rest = np.delete(amax, idx)
        what = (f"{len(idx)} of {amax.size} input channels computed in FP (max|X| "
                f"{', '.join(f'{v:.3g}' for v in amax[idx][:4])}{' ...' if len(idx) > 4 else ''} vs at most "
                f"{rest.max():.3g} for the rest")
        if group.activation in reported:  # smoothed too (split+α): one entry per group, the split as its note
            i = reported[group.activation]
            report.groups[i] = replace(report.groups[i], notes=(*report.groups[i].notes, f"{what})"),
                                       split_channels=len(idx))
        else:
            report.groups.append(GroupResult(group.activation, tuple(group.consumer_names), FoldKind.SPLIT,
                                             f"{what}; {group.skip_reason})", split_channels=len(idx)))
    return done


def _get_stats(loaded: LoadedModel, view: GraphView, linear_ops, calib: CalibSource | None,
               stats: ChannelStats | Sequence[str | os.PathLike] | None, config: SmoothQuantConfig
               ) -> tuple[ChannelStats, dict[str, np.ndarray]]:
    """The statistics, and GPTQ's second moments of the FP inputs where the calibration pass measured them."""
    if stats is not None:
        return (stats if isinstance(stats, ChannelStats) else ChannelStats.merge_files(list(stats))), {}
    data = _calibration_data(loaded, calib, config)
    done = calibrate(loaded, stat_targets(view, linear_ops), data, grams=gram_requests(view, linear_ops,
                                                                                       config.quantization),
                     progress=config.calibration.progress)
    return done.stats, done.grams


def _has_calibration(loaded: LoadedModel, calib: CalibSource | None) -> bool:
    """Calibration data was passed or lies beside the model."""
    return calib is not None or default_calibration_path(loaded.path) is not None


def _one_pass_only(calib: CalibSource | None) -> bool:
    """``calib`` is an iterator: it can be read once."""
    return calib is not None and not isinstance(calib, (str, os.PathLike)) and iter(calib) is calib


def _calibration_data(loaded: LoadedModel, calib: CalibSource | None, config: SmoothQuantConfig) -> CalibrationData:
    if calib is None:
        calib = default_calibration_path(loaded.path)
        if calib is None:
            raise SmoothQuantError(
                f"{loaded.path}: no calibration data: pass --calib DATA (or --stats FILE), or put "
                f"{loaded.path.stem}.calib.npz beside the model"
            )
    return CalibrationData(calib, config.calibration.batch_size)
