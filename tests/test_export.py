"""The model exporters' plumbing: files assembled from wheels, offline (the wheels are made here)."""

from __future__ import annotations

import zipfile

import pytest

from models.export import DEFAULT_SETS, ENCODERS, EXPORTERS, _cached, export
from passes.ir.errors import SmoothQuantError


def make_wheel(cache, name: str, version: str, members: dict[str, bytes]) -> None:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        for member, data in members.items():
            z.writestr(member, data)


def test_a_file_split_over_wheels_is_joined_in_order_once(tmp_path):
    parts = [(f"blob-part-{i}", "1.0", f"blob_part_{i}/data/blob.part{i:02d}") for i in range(3)]
    for i, (name, version, member) in enumerate(parts):
        make_wheel(tmp_path, name, version, {member: bytes([i]) * (i + 1)})
    target = tmp_path / "blob" / "blob.bin"
    assert _cached(target, parts, tmp_path).read_bytes() == b"\x00\x01\x01\x02\x02\x02"
    for wheel in (tmp_path / "wheels").iterdir():  # a second call reads nothing
        wheel.unlink()
    assert _cached(target, parts, tmp_path).read_bytes() == b"\x00\x01\x01\x02\x02\x02"
    assert not list(target.parent.glob("*.tmp"))


def test_every_model_has_text_sets_and_a_task():
    assert set(DEFAULT_SETS) == set(EXPORTERS) and set(ENCODERS) <= set(EXPORTERS)
    with pytest.raises(SmoothQuantError, match="unknown model 'nope'"):
        export("nope", __import__("pathlib").Path("."))


def test_a_failed_assembly_leaves_no_file(tmp_path):
    parts = [("blob-part-0", "1.0", "blob_part_0/data/a"), ("blob-part-1", "1.0", "blob_part_1/data/b")]
    make_wheel(tmp_path, "blob-part-0", "1.0", {"blob_part_0/data/a": b"abc"})
    make_wheel(tmp_path, "blob-part-1", "1.0", {"blob_part_1/data/other": b"x"})  # the member is missing
    target = tmp_path / "blob" / "blob.bin"
    with pytest.raises(KeyError):
        _cached(target, parts, tmp_path)
    assert not target.exists() and not list(target.parent.iterdir())
