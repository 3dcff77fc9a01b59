"""``python -m bench.fuzz --cases N``: the CLI fuzzer (tests/fuzz.py) over many seeds; prints a table.

Each row: a corruption class, how many cases ran, their exit codes, and the problems found (a
traceback, an input changed, a partial output, an invalid or, with ``--smooth-only``, inexact output).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz import run_case  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--first-seed", type=int, default=1000, help="seeds first-seed .. first-seed+cases-1 "
                                                                "(the tests use 0..39)")
    p.add_argument("--json", help="write every case here")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.cases):
            rows.append(run_case(seed, Path(tmp) / str(seed)))
    by = collections.defaultdict(list)
    for case in rows:
        by[case.corruption].append(case)
    print(f"{'corruption':<16} {'cases':>5}  exit codes            problems")
    for kind, cases in sorted(by.items()):
        codes = collections.Counter(c.code for c in cases)
        problems = sum(1 for c in cases if c.problems)
        print(f"{kind:<16} {len(cases):>5}  {dict(sorted(codes.items(), key=str))!s:<21} {problems}")
    bad = [c for c in rows if c.problems]
    modes = collections.Counter(" ".join(c.mode) or "(default)" for c in rows if c.code == 0)
    print(f"{len(rows)} cases in {time.perf_counter() - start:.0f} s, {sum(c.code == 0 for c in rows)} exit 0 "
          f"(by mode: {dict(modes)}), {len(bad)} with problems")
    errors = collections.Counter((c.corruption, c.error.split(":")[-1].strip()[:70]) for c in rows
                                 if c.code == 1 and c.corruption == "none")
    for (kind, error), n in errors.most_common(8):
        print(f"  uncorrupted, exit 1 x{n}: {error}")
    for c in bad[:20]:
        print(f"  seed {c.seed} {c.mode} {c.corruption} exit {c.code}: {c.problems}")
    if args.json:
        Path(args.json).write_text(json.dumps([c.__dict__ for c in rows], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
