"""Output paths that cannot destroy an input: checked once, before any work starts.

A run reads its model (and the model's external-data files), calibration data, statistics and
text; it writes a model (and maybe ``<model>.data``), statistics, an engine, a timing cache. Every
output is refused, with a one-line error naming both paths, when it

- resolves to a file the run reads (the same path after symlinks, or the same file through a
  hard link), or to another output of the same run;
- is a symbolic link (outputs are replaced by rename, which would replace the link, not its
  target: give the real path), or exists and is not a regular file (a folder, a device, a FIFO);
- lies in a folder that exists but cannot be written, or under a path component that is a file.

Missing folders are fine: they are created when the output is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from passes.ir.errors import SmoothQuantError


def model_files(proto, path: Path) -> list[Path]:
    """The model file and every external-data file its initializers point at."""
    base = Path(path).parent
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return [Path(path)] + [base / loc for loc in sorted(locations) if loc]


def data_files(source) -> list[Path]:
    """The files a calibration or statistics source names: a file, a folder's files, or a list of them."""
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return sorted(c for c in p.iterdir() if c.is_file()) if p.is_dir() else [p]
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        return [f for s in source for f in data_files(s)]
    return []  # in-memory feeds or statistics


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Path | None], reads: Iterable[Path]) -> None:
    """Raise :class:`SmoothQuantError` if an output (label -> path) could touch an input or is unusable."""
    reads = [Path(r) for r in reads]
    given = [(label, Path(p)) for label, p in outputs.items() if p is not None]
    for i, (label, out) in enumerate(given):
        if out.is_symlink():
            raise SmoothQuantError(f"{out}: the {label} is a symbolic link; give the path it points at "
                                   f"({os.path.realpath(out)}): outputs are replaced, not written through")
        if out.exists() and not out.is_file():
            raise SmoothQuantError(f"{out}: the {label} exists and is not a regular file")
        for read in reads:
            if _same(out, read):
                raise SmoothQuantError(f"{out}: the {label} would overwrite {read}, which this run reads")
        for other_label, other in given[:i]:
            if _same(out, other):
                raise SmoothQuantError(f"{out}: the {label} and the {other_label} are the same file")
        folder = out.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise SmoothQuantError(f"{out}: the {label} cannot be created: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SmoothQuantError(f"{out}: the {label} cannot be written: {folder} is not writable")
