"""Engine builder: what runs without TensorRT (checks, profiles, trtexec command, install hint),
and the real build where TensorRT and a GPU exist (skipped here)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from passes.build_engine import EngineConfig, Profile, build_engine, main, prepare
from passes.ir.errors import SmoothQuantError
from passes.pipeline import run_smoothquant

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
BERT_PROFILES = (Profile.parse("input_ids:1x8,4x32,8x64"), Profile.parse("attention_mask:1x8,4x32,8x64"))


@pytest.fixture(scope="module")
def quantized_bert(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "bert.sq.onnx"
    run_smoothquant(demo_dir / "tiny_bert.onnx", out)
    return out


def test_profile_parsing():
    p = Profile.parse("past:key:1x4x1x64,1x4x128x64,1x4x512x64")  # input names may hold ':'
    assert p.name == "past:key" and p.min == (1, 4, 1, 64) and p.max == (1, 4, 512, 64)
    for bad in ("input_ids", "input_ids:1x8,4x32", "input_ids:1xA,1x2,1x3"):
        with pytest.raises(SmoothQuantError, match="--profile"):
            Profile.parse(bad)


def test_plugin_impl_option():
    from passes.build_engine import PluginImpl, engine_config_from_args, get_parser

    args = get_parser().parse_args(["m.onnx", "-o", "m.plan"])
    assert engine_config_from_args(args).plugin_impl is PluginImpl.AOT  # engines that run without Python
    args = get_parser().parse_args(["m.onnx", "-o", "m.plan", "--plugin-impl", "jit"])
    assert engine_config_from_args(args).plugin_impl is PluginImpl.JIT
    with pytest.raises(SystemExit):
        get_parser().parse_args(["m.onnx", "--plugin-impl", "cubin"])


def test_trtexec_command(quantized_bert, tmp_path):
    _, command = prepare(quantized_bert, tmp_path / "e.plan",
                         EngineConfig(BERT_PROFILES, timing_cache=tmp_path / "tc.bin", workspace_mib=1024))
    assert command == (f"trtexec --onnx={quantized_bert} --saveEngine={tmp_path / 'e.plan'} --stronglyTyped "
                       "--minShapes=input_ids:1x8,attention_mask:1x8 --optShapes=input_ids:4x32,attention_mask:4x32 "
                       f"--maxShapes=input_ids:8x64,attention_mask:8x64 --timingCacheFile={tmp_path / 'tc.bin'} "
                       "--memPoolSize=workspace:1024M")


@pytest.mark.parametrize("profiles, message", [
    ((), "need an optimization profile .*input_ids"),
    ((BERT_PROFILES[0],), "attention_mask"),
    (BERT_PROFILES + (Profile.parse("pixels:1x3,1x3,1x3"),), "names 'pixels'"),
    ((Profile.parse("input_ids:1x8x1,4x32x1,8x64x1"), BERT_PROFILES[1]), "rank 2"),
    ((Profile.parse("input_ids:4x8,1x32,8x64"), BERT_PROFILES[1]), "min <= opt <= max"),
])
def test_bad_profiles(quantized_bert, tmp_path, profiles, message):
    with pytest.raises(SmoothQuantError, match=message):
        prepare(quantized_bert, tmp_path / "e.plan", EngineConfig(profiles))


def test_rule_violations_stop_the_build(demo_dir, tmp_path):
    from passes import SmoothQuantConfig
    from passes.config import QuantizationConfig, Target

    ort_model = tmp_path / "ort.onnx"
    run_smoothquant(demo_dir / "tiny_bert.onnx", ort_model,
                    config=SmoothQuantConfig(quantization=QuantizationConfig(target=Target.ONNXRUNTIME)))
    with pytest.raises(SmoothQuantError, match=r"zero-point-type\] sq_q::"):
        prepare(ort_model, tmp_path / "e.plan", EngineConfig(BERT_PROFILES))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_gives_install_hint_and_writes_nothing(quantized_bert, tmp_path, capsys):
    plan = tmp_path / "e.plan"
    profiles = ["--profile", "input_ids:1x8,4x32,8x64", "--profile", "attention_mask:1x8,4x32,8x64"]
    args = [str(quantized_bert), "-o", str(plan)] + profiles
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "trtexec --onnx=" in captured.out and "pip install" in captured.err and not plan.exists()
    # The main CLI fails before doing any work.
    from passes.smoothquant import main as sq_main

    out = tmp_path / "q.onnx"
    assert sq_main([str(quantized_bert.parent.parent / "x.onnx"), "-o", str(out), "--engine", str(plan)]) == 1
    assert sq_main([str(quantized_bert), "-o", str(out), "--engine", str(plan)]) == 1
    assert "pip install" in capsys.readouterr().err and not out.exists() and not plan.exists()


@pytest.mark.skipif(not HAVE_TRT or shutil.which("nvidia-smi") is None, reason="needs TensorRT and an NVIDIA GPU")
def test_build_engine_with_tensorrt(quantized_bert, tmp_path):
    cache = tmp_path / "timing.cache"
    result = build_engine(quantized_bert, tmp_path / "e.plan", EngineConfig(BERT_PROFILES, timing_cache=cache))
    assert result.engine.stat().st_size > 0 and cache.stat().st_size > 0


def test_a_plugin_module_that_fails_to_import_is_one_line():
    from passes.build_engine import import_plugin_modules

    with pytest.raises(SmoothQuantError, match=r"^--python-plugins no_such_plugins: importing it failed "
                                               r"\(ModuleNotFoundError: No module named 'no_such_plugins'\)$"):
        import_plugin_modules(["no_such_plugins"])


@pytest.mark.parametrize("version, aot, jit, none", [
    ("10.8.0.43", None, 1 << 1, 1 << 1),  # STRONGLY_TYPED = 1; no AOT plugins, no preference flags
    ("10.16.1.11", 1 << 1 | 1 << 3, 1 << 1 | 1 << 2, 1 << 1),  # STRONGLY_TYPED 1, PREFER_JIT 2, PREFER_AOT 3
    ("11.4.0.106", 1 << 2, 1 << 1, 0),  # strongly typed always (flag ignored, not set); PREFER_JIT 1, PREFER_AOT 2
])
def test_network_flags_per_tensorrt_version(version, aot, jit, none):
    """The flags ``create_network`` gets, with the enum of each version (values from NvInfer.h 10.16
    and 11.1, as tests/trt_standin.py has them) and TensorRT's own ``__init__``."""
    from trt_harness import run_python

    code = ("import tensorrt as trt\nfrom passes.build_engine import PluginImpl, network_flags\n"
            "from passes.ir.errors import SmoothQuantError\n"
            "for impl in PluginImpl:\n"
            "    try:\n        print(impl.value, network_flags(trt, impl, True))\n"
            "    except SmoothQuantError as e:\n        print(impl.value, 'error:', e)\n"
            "print('none', network_flags(trt, PluginImpl.AOT, False))\n")
    done = run_python(version, code)
    assert done.returncode == 0, done.stderr
    got = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert got["jit"] == str(jit) and got["none"] == str(none)
    if aot is None:
        assert got["aot"].startswith("error: TensorRT 10.8.0.43 has no AOT Python plugins")
        assert "--plugin-impl jit" in got["aot"]
    else:
        assert got["aot"] == str(aot)
