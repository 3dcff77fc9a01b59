"""Real English text, offline: the paragraphs of *The Debian Administrator's Handbook*.

Debian's ``debian-handbook`` package holds the book as HTML. It is fetched with
``apt-get download`` (no install, no root), unpacked with ``dpkg-deb -x``, and its
``<p>`` paragraphs are cached one per line in ``CACHE/debian-handbook.txt``.

:func:`split` makes calibration and evaluation sets that never share a paragraph.
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from passes.ir.errors import SmoothQuantError

PACKAGE = "debian-handbook"
DEFAULT_CACHE = Path(os.environ.get("SMOOTHQUANT_CACHE", Path.home() / ".cache" / "smoothquant-onnx"))
MIN_WORDS = 8


class _Paragraphs(html.parser.HTMLParser):
    """Text of every paragraph (``<p>``, or Publican's ``<div class="para">``); nested markup
    flattened, ``<pre>`` and scripts skipped."""

    def __init__(self):
        super().__init__()
        self.paragraphs: list[str] = []
        self._tag: str | None = None  # the element that opened the current paragraph
        self._depth = 0  # nesting of that element inside the paragraph
        self._skip = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self._tag is None:
            classes = (dict(attrs).get("class") or "").split()
            if tag == "p" or (tag == "div" and "para" in classes):
                self._tag, self._depth = tag, 1
        elif tag == self._tag:
            self._depth += 1
        if tag in ("pre", "script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag == self._tag:
            self._depth -= 1
            if not self._depth:
                self._tag = None
                text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
                if len(text.split()) >= MIN_WORDS:
                    self.paragraphs.append(text)
                self._parts = []
        elif tag in ("pre", "script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._parts.append(data)


def extract_paragraphs(html_dir: Path) -> list[str]:
    """Paragraphs of every page under ``html_dir`` (sorted by file name), without repeats."""
    seen, out = set(), []
    for page in sorted(html_dir.glob("*.html")):
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        for p in parser.paragraphs:
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def handbook_paragraphs(cache: Path = DEFAULT_CACHE) -> list[str]:
    """The English handbook's paragraphs, fetched once and cached."""
    cached = cache / f"{PACKAGE}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SmoothQuantError(f"{tool} is needed to fetch the {PACKAGE} package (or pass your own text file)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True, text=True)
            deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True, capture_output=True)
        except (subprocess.CalledProcessError, StopIteration) as e:
            detail = getattr(e, "stderr", "") or "no .deb downloaded"
            raise SmoothQuantError(f"could not fetch {PACKAGE} with apt-get download: {str(detail).strip()}") from None
        paragraphs = extract_paragraphs(Path(tmp) / "root/usr/share/doc/debian-handbook/html/en-US")
    if len(paragraphs) < 100:
        raise SmoothQuantError(f"{PACKAGE}: only {len(paragraphs)} paragraphs found; the package layout changed?")
    cache.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_name(f".{cached.name}.tmp")
    tmp_file.write_text("\n".join(paragraphs), encoding="utf-8")
    os.replace(tmp_file, cached)
    return paragraphs


def split(paragraphs: list[str], calib: int, evaluation: int, every: int = 4) -> tuple[list[str], list[str]]:
    """Disjoint sets: evaluation takes every ``every``-th paragraph, calibration the others."""
    held_out = paragraphs[::every]
    rest = [p for i, p in enumerate(paragraphs) if i % every]
    if len(held_out) < evaluation or len(rest) < calib:
        raise SmoothQuantError(f"{len(paragraphs)} paragraphs cannot give {calib} calibration and {evaluation} "
                               f"evaluation samples")
    return rest[:calib], held_out[:evaluation]
