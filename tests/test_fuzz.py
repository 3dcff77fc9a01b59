"""The fuzzer (tests/fuzz.py) over a bounded number of seeded cases; ``python -m bench.fuzz`` runs more."""

from __future__ import annotations

import os

import pytest

from fuzz import run_case

CASES = int(os.environ.get("SMOOTHQUANT_FUZZ_CASES", "40"))
# What python -m bench.fuzz found (a corrupt string that is not UTF-8, a type only ONNX Runtime
# checks) has its own test in tests/test_io_safety.py: seeds change meaning when the generator grows.


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_case(seed, tmp_path):
    case = run_case(seed, tmp_path / "case")
    assert not case.problems, (case.mode, case.corruption, case.code, case.problems)
