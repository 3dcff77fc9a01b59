"""The fuzzer (tests/fuzz.py) over a bounded number of seeded cases; ``python -m bench.fuzz`` runs more."""

from __future__ import annotations

import os

import pytest

from fuzz import run_case

CASES = int(os.environ.get("SMOOTHQUANT_FUZZ_CASES", "40"))
# Seeds python -m bench.fuzz found problems with (then fixed): a flipped byte that made a string
# field invalid UTF-8 (ONNX's checker raised UnicodeDecodeError).
FOUND = (1422, 2135)


@pytest.mark.parametrize("seed", [*range(CASES), *FOUND])
def test_fuzz_case(seed, tmp_path):
    case = run_case(seed, tmp_path / "case")
    assert not case.problems, (case.mode, case.corruption, case.code, case.problems)
