"""TensorRT's own Python plugin layer, installed from its PyPI wheel, for tests on machines without TensorRT.

``tensorrt-cu12-bindings`` is a real wheel; only its compiled core needs NVIDIA's libraries. This
fetches a version with ``pip download`` (cached under ``$SMOOTHQUANT_CACHE/tensorrt-bindings``),
unpacks its pure Python (the package ``__init__.py`` and ``plugin/``; nothing of it is copied into
this repository) and puts :mod:`tests.trt_standin` where ``tensorrt.so`` would be. Each run happens
in a fresh interpreter (:func:`run_driver`), because ``tensorrt.plugin`` keeps its registry in module
globals and a NumPy major version is fixed per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from models.export import fetch_wheel
from models.text import DEFAULT_CACHE

REPO = Path(__file__).resolve().parents[1]
WHEEL = "tensorrt-cu12-bindings"
# 10.8: the last without AOT plugins; 10.9: the first with them; 10.16: the last 10.x; 11.4: the newest.
VERSIONS = ("10.8.0.43", "10.9.0.34", "10.16.1.11", "11.4.0.106")
NUMPY1 = "1.26.4"
SHIM = "# the compiled core's place: the stand-in (tests/trt_standin.py)\nfrom trt_standin import *  # noqa: F403\n"


def plugin_layer(version: str, cache: Path = DEFAULT_CACHE) -> Path:
    """A directory holding package ``tensorrt`` for ``version``: the wheel's Python over the stand-in."""
    root = cache / "tensorrt-bindings" / version
    package = root / "tensorrt"
    if not (package / "plugin" / "__init__.py").is_file():
        tmp = root.with_name(f"{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with fetch_wheel(cache, WHEEL, version) as wheel:
            members = [m for m in wheel.namelist() if m.startswith("tensorrt_bindings/") and m.endswith(".py")]
            for member in members:
                target = tmp / "tensorrt" / member.removeprefix("tensorrt_bindings/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(member))
        (tmp / "tensorrt" / "tensorrt.py").write_text(SHIM)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def numpy1(cache: Path = DEFAULT_CACHE) -> Path:
    """NumPy 1.x installed apart (``pip install --target``), to put first on a child's path."""
    target = cache / f"numpy-{NUMPY1}"
    if not (target / "numpy" / "__init__.py").is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), f"numpy=={NUMPY1}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip install numpy=={NUMPY1} failed: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    return target


@dataclass
class DriverRun:
    returncode: int
    report: dict
    stderr: str


def layer_env(version: str, numpy_dir: Path | None = None) -> dict[str, str]:
    """The environment of a child interpreter whose ``tensorrt`` is the wheel's layer of ``version``."""
    path = [str(plugin_layer(version)), str(REPO), str(REPO / "tests")]
    if numpy_dir is not None:
        path.insert(0, str(numpy_dir))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TRT_STANDIN_VERSION": version}


def run_python(version: str, code: str) -> subprocess.CompletedProcess:
    """``python -c code`` under the layer of ``version``."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=layer_env(version),
                          cwd=REPO)


def run_driver(version: str, spec: Path, impl: str, *, numpy_dir: Path | None = None, run: bool = False,
               interface: bool = False) -> DriverRun:
    """``tests/trt_driver.py`` in a child interpreter with ``tensorrt`` = the wheel's layer of ``version``."""
    env = layer_env(version, numpy_dir)
    if not run:  # no GPU to ask: compile the AOT kernels for sm_90 (H100/H200)
        env.setdefault("SMOOTHQUANT_AOT_ARCH", "90")
    cmd = [sys.executable, str(REPO / "tests" / "trt_driver.py"), str(spec), impl]
    cmd += (["--run"] if run else []) + (["--interface"] if interface else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"stdout": done.stdout[-2000:]}
    return DriverRun(done.returncode, report, done.stderr)

