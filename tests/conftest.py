"""Shared helpers: demo models exported once per session, ORT runs, relative error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.tiny import TinyConfig, make_inputs, write_demo


def run(model: str | Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """max |got - ref| / max |ref| over all outputs."""
    return max(float(np.abs(g.astype(np.float64) - r).max() / np.abs(r).max()) for r, g in zip(ref, got))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def initializer_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def random_feeds(name: str, seed: int, samples: int = 4, length: int = 24) -> dict[str, np.ndarray]:
    """Uniform random tokens (unlike any text) for the demo model ``name``."""
    rng = np.random.default_rng(seed)
    feeds = make_inputs(name, rng, samples, length, TinyConfig())
    feeds["input_ids"] = rng.integers(0, TinyConfig().vocab, size=feeds["input_ids"].shape, dtype=np.int64)
    return feeds


def text_like_feeds(name: str, seed: int, samples: int = 4, length: int = 24) -> dict[str, np.ndarray]:
    """Zipf-distributed tokens (like text), from a seed unused by calibration."""
    return make_inputs(name, np.random.default_rng(seed), samples, length, TinyConfig())


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo(out)
    write_demo(out, ("tiny_bert",), legacy=True)
    return out
